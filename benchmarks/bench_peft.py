"""LoRA training and inference steps on CPU: vanilla PEFT on the unfused model vs splice, side by side.

    python benchmarks/bench_peft.py [--layers 4] [--batch 4] [--seq 128] [--repeats 7] [--targets q_proj,v_proj,up_proj]

One process, same weights, same LoRA initialization (checked), same outputs (checked), rounds
interleaved so noise spreads over all variants. Printed: the median time per step and its ratio to
vanilla PEFT. With one thread (the default) the clock is this process's CPU time, which other jobs on
a shared machine barely disturb; with more threads it is wall time.

- train: forward + backward + AdamW step.
  - vanilla PEFT on the unfused model
  - splice.peft on the model fused with qkv + gate_up (LoRA layers around the slices)
- infer: forward under no_grad.
  - vanilla PEFT on the unfused model
  - splice.peft on the fused model
  - splice.peft on the fused model with ``fuse_lora=True`` (one LoRA GEMM per fused Linear)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch


def build(args: argparse.Namespace):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=max(512, args.seq),
    )  # fmt: skip
    torch.manual_seed(0)
    weights = transformers.LlamaForCausalLM(config).state_dict()

    def fresh():
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(weights)
        return model

    return fresh


def time_it(step: Callable[[], None], clock: Callable[[], float]) -> float:
    start = clock()
    step()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--targets", default="q_proj,v_proj,up_proj")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter

    import peft

    import splice
    import splice.peft

    fresh = build(args)
    targets = args.targets.split(",")
    config = lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)  # noqa: E731
    fused_model = fresh()
    splice.fuse(fused_model, {"qkv": True, "gate_up": True})
    unfused = fresh()
    torch.manual_seed(1)
    vanilla = peft.get_peft_model(unfused, config())
    torch.manual_seed(1)
    fused = splice.peft.get_peft_model(fused_model, config())
    a = {k: v for k, v in vanilla.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in fused.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "different LoRA init"

    ids = torch.randint(3, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def train_step(model, optimizer):
        def step():
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def infer_step(model):
        def step():
            with torch.no_grad():
                model(ids)

        return step

    with tempfile.TemporaryDirectory() as adapter:
        vanilla.save_pretrained(adapter)
        fused_lora_model = fresh()
        splice.fuse(fused_lora_model, {"qkv": True, "gate_up": True})
        fused_lora = splice.peft.load_adapter(fused_lora_model, adapter, fuse_lora=True)
    inference = {
        "vanilla PEFT, unfused": vanilla,
        "splice.peft, fused": fused,
        "splice.peft, fused + fuse_lora": fused_lora,
    }
    for model in inference.values():
        model.eval()
    with torch.no_grad():
        reference = vanilla(ids).logits
        for name, model in inference.items():
            torch.testing.assert_close(model(ids).logits, reference, atol=1e-4, rtol=1e-4, msg=name)

    variants: dict[str, Callable[[], None]] = {}
    for name, model in list(inference.items())[:2]:
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        variants[f"train  {name}"] = train_step(model, torch.optim.AdamW(trainable, lr=1e-4))
    for name, model in inference.items():
        variants[f"infer  {name}"] = infer_step(model)

    for step in variants.values():  # warm-up
        step()
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, step in variants.items():
            if name.startswith("infer"):
                for model in inference.values():
                    model.eval()
            else:
                for model in inference.values():
                    model.train()
            runs[name].append(time_it(step, clock))

    print(
        f"Llama 512/1376 x{args.layers} layers (GQA 8/4), batch {args.batch} x {args.seq} tokens, "
        f"LoRA r=16 on {targets}, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time, "
        f"median of {args.repeats}"
    )
    baselines = {"train": statistics.median(runs["train  vanilla PEFT, unfused"])}
    baselines["infer"] = statistics.median(runs["infer  vanilla PEFT, unfused"])
    for name, times in runs.items():
        median = statistics.median(times)
        print(f"  {name:<40} {median * 1e3:8.1f} ms   x{baselines[name[:5]] / median:.2f} vs vanilla")


if __name__ == "__main__":
    main()
