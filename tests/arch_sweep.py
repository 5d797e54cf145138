"""Every causal-LM and image-text-to-text architecture in the installed transformers, tiny, through splice.

`tiny_config(model_type)` shrinks the architecture's default config generically (sizes, layers, heads,
vocabulary, vision/audio sub-configs; GQA kept where the default has it). `sweep_one(mapping,
model_type)` then builds the model with a fixed seed, saves it with transformers, and loads it with
`splice.from_pretrained` unfused, with each registered family alone and with every family that
worked together; each load is checked against the in-memory model (fp32 logits, atol 1e-5; the
vision tower's output for VLMs where it can be driven generically) and saved back with
`splice.save_pretrained`, compared tensor by tensor, bitwise, with the source checkpoint.

Outcomes per (architecture, fusion): ``exact``, ``n/a`` (the family found nothing to fuse), ``refused``
(a `SpliceError` at load, with its message), ``wrong`` (logits or save differ) and ``crash`` (any
other exception, or a SpliceError raised at forward time instead of at load).
"""

from __future__ import annotations

import inspect
import re
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

MAPPINGS = ("causal_lm", "image_text_to_text")
SEED = 0
ATOL = 1e-5

HIDDEN = (
    "hidden_size",
    "d_model",
    "n_embd",
    "n_embed",
    "embed_dim",
    "hidden_dim",
    "dim",
    "model_dim",
    "width",
)
INTERMEDIATE = (
    "intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "mlp_dim", "decoder_ffn_dim",
    "encoder_ffn_dim", "intermediate_size_mlp", "inner_hidden_size", "d_inner", "ffn_hidden_dim",
    "dense_intermediate_size", "block_intermediate_size",
)  # fmt: skip
EXPERT_INTERMEDIATE = (
    "moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
    "moe_ffn_hidden_size", "shared_intermediate_size",
)  # fmt: skip
LAYERS = (
    "num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers", "depth",
    "num_decoder_layers", "num_encoder_layers", "text_layers", "vision_layers",
)  # fmt: skip
HEADS = (
    "num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
    "encoder_attention_heads", "num_attention_heads_per_layer",
)  # fmt: skip
KV_HEADS = (
    "num_key_value_heads",
    "n_kv_heads",
    "num_kv_heads",
    "multi_query_group_num",
    "n_head_kv",
    "kv_heads",
)
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K = ("num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token", "moe_k", "num_selected_experts")
HIDDEN_SIZE, HEADS_COUNT, HEAD_DIM, LAYERS_COUNT, VOCAB = 64, 4, 16, 2, 512


def _per_layer(name: str, value: Any, count: int) -> bool:
    if isinstance(value, str):  # hybrid_override_pattern = "M-M*-..."; not attention_type = "block_sparse"
        return len(value) == count and count > 1 and "pattern" in name
    return isinstance(value, (list, tuple)) and len(value) == count and count > 1


def _layer_selection(values: list[Any], count: int) -> list[int]:
    """Layers to keep: the first of each distinct kind (so hybrid models keep every kind), at least two."""
    keep: list[int] = []
    for seq in values:
        seen: dict[Any, int] = {}
        for i, item in enumerate(seq):
            seen.setdefault(repr(item), i)
        keep.extend(seen.values())
    keep = sorted(set(keep))[:6]
    i = 0
    while len(keep) < min(LAYERS_COUNT, count):
        if i not in keep:
            keep.append(i)
        i += 1
    return sorted(keep)


def _shrink_one(config: Any, ids: dict[int, int]) -> None:
    """Shrink one (sub-)config in place; ``ids`` collects token ids to remap into the small vocabulary."""
    attrs = config.__dict__
    before = {n: v for n, v in attrs.items() if isinstance(v, int) and not isinstance(v, bool)}
    _shrink_sizes(config, ids)
    # head sizes that were equal stay equal (DeepSeek's head_dim is its qk_rope_head_dim); rotary dims fit a head
    groups: dict[int, list[str]] = {}
    for name, value in before.items():
        if "head_dim" in name or name in ("rotary_dim", "rope_dim"):
            groups.setdefault(value, []).append(name)
    for names in groups.values():
        if len(names) > 1:
            smallest = min(attrs[n] for n in names)
            for n in names:
                setattr(config, n, smallest)
    for name in ("rotary_dim", "rope_dim"):
        hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        head = attrs.get("head_dim") or (hidden // heads if isinstance(hidden, int) and heads else None)
        if isinstance(attrs.get(name), int) and head and attrs[name] > head:
            setattr(config, name, head)
    # sizes derived from head counts (Mamba-2's d_ssm = n_heads * d_head) follow the shrunk heads
    heads = [n for n in before if "head" in n]
    for name, value in before.items():
        if ("ssm" in name or "inner" in name) and attrs.get(name) == value:
            for a in heads:
                for b in heads:
                    if a < b and before[a] * before[b] == value:
                        setattr(config, name, attrs[a] * attrs[b])


def _shrink_sizes(config: Any, ids: dict[int, int]) -> None:
    attrs = config.__dict__
    for name in HIDDEN:
        if isinstance(attrs.get(name), int) and attrs[name] > HIDDEN_SIZE:
            setattr(config, name, HIDDEN_SIZE)
    heads_name = next((n for n in HEADS if isinstance(attrs.get(n), int)), None)
    old_heads = attrs.get(heads_name) if heads_name else None
    if heads_name and old_heads > HEADS_COUNT:
        setattr(config, heads_name, HEADS_COUNT)
    for name in KV_HEADS:
        kv = attrs.get(name)
        if isinstance(kv, int) and old_heads:
            new = 1 if kv == 1 else (HEADS_COUNT if kv >= old_heads else 2)
            setattr(config, name, min(new, attrs[heads_name]))
    if isinstance(attrs.get("head_dim"), int) and attrs["head_dim"] > HEAD_DIM:
        config.head_dim = HEAD_DIM
    for name, small in (
        ("qk_nope_head_dim", 16), ("qk_rope_head_dim", 8), ("v_head_dim", 16), ("kv_lora_rank", 32),
        ("q_lora_rank", 32), ("qk_head_dim", 24), ("linear_key_head_dim", 16), ("linear_value_head_dim", 16),
        ("linear_num_key_heads", 2), ("linear_num_value_heads", 4), ("global_head_dim", 16),
        ("attention_head_dim", 16), ("index_head_dim", 16), ("index_n_heads", 2),
        ("mamba_d_state", 16), ("state_size", 16), ("ssm_state_size", 16), ("mamba_n_heads", 8),
        ("mamba_head_dim", 16), ("mamba_d_head", 16), ("n_groups", 1), ("mamba_n_groups", 1),
        ("num_key_value_groups", 1), ("time_step_rank", 8), ("conv_kernel", 4),
    ):  # fmt: skip
        if isinstance(attrs.get(name), int) and attrs[name] > small:
            setattr(config, name, small)
    for name in INTERMEDIATE:
        if isinstance(attrs.get(name), int) and attrs[name] > 2 * HIDDEN_SIZE:
            setattr(config, name, 96)
    for name in EXPERT_INTERMEDIATE:
        if isinstance(attrs.get(name), int) and attrs[name] > HIDDEN_SIZE:
            setattr(config, name, 32)
    for name in EXPERTS:
        if isinstance(attrs.get(name), int) and attrs[name] > 4:
            setattr(config, name, 4)
    for name in TOP_K:
        if isinstance(attrs.get(name), int) and attrs[name] > 2:
            setattr(config, name, 2)
    for name, small in (
        ("n_group", 1),
        ("topk_group", 1),
        ("n_shared_experts", 1),
        ("num_shared_experts", 1),
    ):
        if isinstance(attrs.get(name), int) and attrs[name] > small:
            setattr(config, name, small)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "seq_length"):
        if isinstance(attrs.get(name), int) and attrs[name] > 512:
            setattr(config, name, 512)
    for name, value in list(attrs.items()):  # whatever other width a config spells its own way
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and value > 4 * HIDDEN_SIZE
            and re.search(r"hidden|intermediate|ffn|_dim$|width|proj.*size|embed.*(size|dim)", name)
            and not re.search(r"vocab|position|image|patch|window|chunk|token|seq|length|max", name)
        ):
            setattr(config, name, HIDDEN_SIZE)
    for name, value in list(attrs.items()):  # vision feature layers index a tower now two layers deep
        if "feature_layer" in name:
            fitted = [_fit_layer(v) for v in value] if isinstance(value, (list, tuple)) else _fit_layer(value)
            setattr(config, name, type(value)(fitted) if isinstance(value, (list, tuple)) else fitted)
    if isinstance(attrs.get("sliding_window"), int) and attrs["sliding_window"] > 64:
        config.sliding_window = 64
    _shrink_layers(config)
    _shrink_vision(config)
    head_dim = attrs.get("head_dim") if isinstance(attrs.get("head_dim"), int) else None
    if head_dim is None and isinstance(attrs.get("hidden_size"), int) and heads_name and attrs[heads_name]:
        head_dim = attrs["hidden_size"] // attrs[heads_name]
    for name in ("rope_parameters", "rope_scaling"):  # M-RoPE sections split half a head
        rope = attrs.get(name)
        section = rope.get("mrope_section") if isinstance(rope, dict) else None
        if isinstance(rope, dict) and section is None and _mentions_mrope(type(config)):
            section = [16, 24, 24]  # the modeling code's default when the config states none
        if head_dim and isinstance(section, list) and sum(section) != head_dim // 2:
            scaled = [max(1, v * (head_dim // 2) // sum(section)) for v in section]
            scaled[0] += head_dim // 2 - sum(scaled)
            rope["mrope_section"] = scaled
    if isinstance(attrs.get("vocab_size"), int) and attrs["vocab_size"] > VOCAB:
        config.vocab_size = VOCAB
    for name, value in list(attrs.items()):
        if re.search(r"(token_id|token_index|_id)s?$", name) and name != "vocab_size":
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and not isinstance(v, bool) and v >= VOCAB - 64:
                    ids.setdefault(v, VOCAB - 1 - len(ids))


def _mentions_mrope(config_class: type) -> bool:
    try:
        return "mrope_section" in inspect.getsource(inspect.getmodule(config_class))
    except (OSError, TypeError):
        return False


def _fit_layer(index: Any) -> Any:
    if not isinstance(index, int) or -LAYERS_COUNT <= index < LAYERS_COUNT:
        return index
    return -1 if index < 0 else 1


def _shrink_layers(config: Any) -> None:
    attrs = config.__dict__
    layers_name = next((n for n in LAYERS if isinstance(attrs.get(n), int)), None)
    if layers_name is None:
        return
    count = attrs[layers_name]
    lists = {n: v for n, v in attrs.items() if _per_layer(n, v, count) and not n.startswith("_")}
    keep = _layer_selection(list(lists.values()), count)
    if len(keep) >= count:
        return
    for name, value in lists.items():
        picked = [value[i] for i in keep]
        setattr(config, name, "".join(picked) if isinstance(value, str) else type(value)(picked))
    for name, value in list(attrs.items()):  # lists of layer indices
        if (
            isinstance(value, (list, tuple))
            and value
            and name not in lists
            and re.search(r"layer|idx|indices|index", name)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < count for v in value)
        ):
            setattr(config, name, type(value)(keep.index(v) for v in value if v in keep))
    for name, value in list(attrs.items()):  # {layer index: settings}
        if isinstance(value, dict) and value and all(isinstance(k, int) for k in value):
            setattr(config, name, {keep.index(k): v for k, v in value.items() if k in keep})
    setattr(config, layers_name, len(keep))
    for name in LAYERS:
        if name != layers_name and attrs.get(name) == count:
            setattr(config, name, len(keep))


def _shrink_vision(config: Any) -> None:
    attrs = config.__dict__
    if isinstance(attrs.get("mm_tokens_per_image"), int):
        config.mm_tokens_per_image = 4
    patch = attrs.get("patch_size")
    size = attrs.get("image_size")
    if isinstance(patch, int) and isinstance(size, int) and size > 4 * patch:
        config.image_size = 4 * patch
    elif isinstance(patch, int) and isinstance(size, (list, tuple)) and len(size) == 2:
        config.image_size = type(size)([4 * patch, 4 * patch])
    if isinstance(attrs.get("num_image_tokens"), int) and isinstance(patch, int):
        config.num_image_tokens = 16


def _all_configs(config: Any) -> list[Any]:
    out, stack = [], [config]
    while stack:
        c = stack.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        for name, value in vars(c).items():
            if hasattr(value, "to_dict") and hasattr(value, "model_type") and not name.startswith("_"):
                stack.append(value)
    return out


def _remap_ids(config: Any, ids: dict[int, int]) -> None:
    for name, value in list(vars(config).items()):
        if not re.search(r"(token_id|token_index|_id)s?$", name):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value in ids:
            setattr(config, name, ids[value])
        elif isinstance(value, (list, tuple)) and any(v in ids for v in value if isinstance(v, int)):
            setattr(config, name, type(value)(ids.get(v, v) for v in value))


def tiny_config(model_type: str) -> Any:
    """The architecture's default config, shrunk; raises when the default cannot even be built."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    ids: dict[int, int] = {}
    configs = _all_configs(config)
    for c in configs:
        _shrink_one(c, ids)
    for c in configs:
        _remap_ids(c, ids)
    for c in configs:
        c._attn_implementation = "eager"
    config.tie_word_embeddings = getattr(config, "tie_word_embeddings", False)
    return config


def special_ids(config: Any) -> set[int]:
    found: set[int] = set()
    for c in _all_configs(config):
        for name, value in vars(c).items():
            if re.search(r"(token_id|token_index|_id)s?$", name):
                for v in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(v, int) and not isinstance(v, bool):
                        found.add(v)
    return found


def model_class(mapping: str, model_type: str) -> Any:
    import transformers
    from transformers.models.auto import modeling_auto

    names = {
        "causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "image_text_to_text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    }[mapping]
    return getattr(transformers, names[model_type])


def architectures() -> list[tuple[str, str]]:
    from transformers.models.auto import modeling_auto

    return [(m, t) for m in MAPPINGS for t in sorted(getattr(modeling_auto, _MAPPING_NAMES[m]))]


_MAPPING_NAMES = {
    "causal_lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "image_text_to_text": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
}


# --------------------------------------------------------------------------------------------------
# running one architecture


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _inputs(config: Any) -> dict[str, torch.Tensor]:
    avoid = special_ids(config)
    vocab = min(
        (v for c in _all_configs(config) if isinstance(v := getattr(c, "vocab_size", None), int)),
        default=VOCAB,
    )
    pool = [i for i in range(3, min(vocab, 200)) if i not in avoid]
    generator = torch.Generator().manual_seed(SEED)
    index = torch.randint(0, len(pool), (1, 8), generator=generator)
    return {"input_ids": torch.tensor(pool)[index]}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, use_cache=False) if _takes(model, "use_cache") else model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else _tensors(out)[0]


def _takes(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def vision_inputs(model: Any) -> dict[str, torch.Tensor] | None:
    """pixel_values (and a grid, for Qwen2-VL-style towers) for ``get_image_features``, or None."""
    getter = getattr(model, "get_image_features", None)
    vision = getattr(model.config, "vision_config", None)
    if getter is None or vision is None:
        return None
    generator = torch.Generator().manual_seed(SEED + 1)
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or 3
    params = inspect.signature(getter).parameters
    patch = getattr(vision, "patch_size", 14)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if "image_grid_thw" in params:
        temporal = getattr(vision, "temporal_patch_size", 2) or 1
        merge = getattr(vision, "spatial_merge_size", 2) or 1
        grid = torch.tensor([[1, 2 * merge, 2 * merge]])
        rows = int(grid.prod())
        pixels = torch.randn(rows, channels * temporal * patch * patch, generator=generator)
        return {"pixel_values": pixels, "image_grid_thw": grid}
    size = getattr(vision, "image_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not isinstance(size, int):
        return None
    inputs = {"pixel_values": torch.randn(1, channels, size, size, generator=generator)}
    if "image_sizes" in params:
        inputs["image_sizes"] = torch.tensor([[size, size]])
    return inputs


def _vision(model: Any, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return _tensors(model.get_image_features(**inputs))


def _compare(expected: list[torch.Tensor], got: list[torch.Tensor]) -> str | None:
    if len(expected) != len(got):
        return f"{len(got)} outputs, expected {len(expected)}"
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            return f"shape {list(g.shape)}, expected {list(e.shape)}"
        if not e.is_floating_point():
            if not torch.equal(e, g):
                return "integer output differs"
            continue
        if torch.isnan(g).any() and not torch.isnan(e).any():
            return "NaN in the output"
        diff = (e.float() - g.float()).abs().nan_to_num(0).max().item() if e.numel() else 0.0
        if not diff <= ATOL:
            return f"max abs diff {diff:.3g}"
    return None


def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _compare_saved(source: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    if set(source) != set(saved):
        lost = sorted(set(source) - set(saved))
        extra = sorted(set(saved) - set(source))
        return f"save lacks {lost[:3]} has extra {extra[:3]}"
    for key, tensor in source.items():
        other = saved[key]
        if tensor.dtype != other.dtype or tensor.shape != other.shape:
            return f"save: {key} is {other.dtype}{list(other.shape)}, expected {tensor.dtype}{list(tensor.shape)}"
        if not torch.equal(tensor.view(-1).view(torch.uint8), other.view(-1).view(torch.uint8)):
            return f"save: {key} differs bitwise"
    return None


def build(mapping: str, model_type: str) -> tuple[Any, Any]:
    cls = model_class(mapping, model_type)
    config = tiny_config(model_type)
    torch.manual_seed(SEED)
    model = cls(config).eval().float()
    return cls, model


def families() -> list[str]:
    import splice.fusion

    return list(splice.fusion.registered_families())


def sweep_one(mapping: str, model_type: str, family_names: list[str] | None = None) -> dict[str, Any]:
    """Every fusion config on one architecture: ``{"model": ..., "status": ..., "results": {config: (outcome, detail)}}``."""
    import splice
    from splice.errors import FusionError, SpliceError

    record: dict[str, Any] = {"mapping": mapping, "model_type": model_type, "results": {}}
    try:
        cls, model = build(mapping, model_type)
        inputs = _inputs(model.config)
        expected = _logits(model, inputs)
    except Exception as exc:
        record["status"] = f"not buildable: {_first_line(exc)}"
        return record
    record["status"] = "built"
    record["class"] = type(model).__name__
    pixel = vision_inputs(model)
    vision_expected = None
    if pixel is not None:
        try:
            vision_expected = _vision(model, pixel)
        except Exception as exc:
            try:  # towers that take a batch of images per sample (Idefics3)
                pixel = {**pixel, "pixel_values": pixel["pixel_values"].unsqueeze(1)}
                vision_expected = _vision(model, pixel)
                record["vision"] = "checked"
            except Exception:
                record["vision"] = f"not feasible: {_first_line(exc)}"
        else:
            record["vision"] = "checked"
    with tempfile.TemporaryDirectory() as tmp:
        source_dir = Path(tmp) / "source"
        try:  # the baseline: transformers saving, then loading its own save
            model.save_pretrained(source_dir)
            source = _read_dir(source_dir)
            del model
            plain = cls.from_pretrained(source_dir, dtype=torch.float32).eval()
            problem = _compare([expected], [_logits(plain, inputs)])
            del plain
        except Exception as exc:
            problem = _first_line(exc)
        if problem is not None:
            record["status"] = f"not buildable: transformers does not reload its own save ({problem})"
            return record

        def attempt(config: dict[str, Any]) -> tuple[str, str]:
            try:
                loaded = splice.from_pretrained(cls, source_dir, fusion_config=config, dtype=torch.float32)
            except FusionError as exc:
                if "found no" in str(exc):
                    return "n/a", _first_line(exc)
                return "refused", _first_line(exc)
            except SpliceError as exc:
                return "refused", _first_line(exc)
            except Exception as exc:
                return "crash", f"at load: {_first_line(exc)}"
            try:
                got = _logits(loaded, inputs)
                problem = _compare([expected], [got])
                if problem is None and vision_expected is not None:
                    problem = _compare(vision_expected, _vision(loaded, pixel))
                    problem = problem and f"vision: {problem}"
                if problem is None:
                    out = Path(tmp) / "saved"
                    splice.save_pretrained(loaded, out)
                    problem = _compare_saved(source, _read_dir(out))
            except Exception as exc:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                return "crash", f"{_first_line(exc)} ({Path(where.filename).name}:{where.lineno})"
            return ("wrong", problem) if problem else ("exact", "")

        results = record["results"]
        results["{}"] = attempt({})
        working = []
        for name in family_names if family_names is not None else families():
            results[name] = attempt({name: True})
            if results[name][0] == "exact":
                working.append(name)
        if len(working) > 1:
            results["+".join(working)] = attempt(dict.fromkeys(working, True))
    return record


def summarize(records: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"exact": 0, "wrong": 0, "crash": 0, "refused": 0, "n/a": 0, "not buildable": 0}
    for r in records:
        if r["status"] != "built":
            counts["not buildable"] += 1
            continue
        for outcome, _ in r["results"].values():
            counts[outcome] += 1
    return counts


def main_one(mapping: str, model_type: str) -> dict[str, Any]:  # for child processes
    try:
        return sweep_one(mapping, model_type)
    except Exception as exc:  # the harness itself failed: report it as a crash of the whole row
        return {
            "mapping": mapping,
            "model_type": model_type,
            "status": "built",
            "results": {"{}": ("crash", f"harness: {_first_line(exc)}")},
        }
