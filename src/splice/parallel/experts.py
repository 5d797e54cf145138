"""MoE experts under tensor and expert parallelism, the way transformers' own plans shard them.

Mixtral, Qwen2-MoE and Qwen3-MoE keep one ``[E, 2I, H]`` ``gate_up_proj`` (each expert's gate rows,
then its up rows) and one ``[E, H, I]`` ``down_proj`` per layer; their checkpoints hold one ``[I, H]``
tensor per expert and projection, stacked on load (`splice.hf.conversions.checkpoint_renames`). Their plans say:

==========================================  =====================  =========================================
transformers plan entry                     splice's TP-global     what a rank holds
                                            layout and cut
==========================================  =====================  =========================================
``experts.gate_up_proj: packed_colwise``    per expert, gate and   ``[E, 2I/tp, H]``: its gate rows, then its
                                            up interleaved per     up rows, of every expert (transformers'
                                            rank; ``Shard(1)``     ``_StridedShard(1, split_factor=2)``)
``experts.down_proj: rowwise``              ``Shard(2)``           ``[E, H, I/tp]``: the matching columns
``experts: moe_tp_experts``                 -                      forward on local weights, outputs summed
                                                                   over the ranks (transformers' own hook)
``experts.*_proj: grouped_gemm`` (EP)       ``Shard(0)``           ``E/ep`` whole experts
``experts: ep_dispatch_experts`` (EP)       -                      tokens reach the experts through
                                                                   transformers' ``EPImplementation``
``*_norm: replicated_with_grad_allreduce``  replicated             whole; its gradient summed over the ranks
==========================================  =====================  =========================================

An ``I`` that ``tp`` does not divide is padded with zero rows (gate and up) and zero columns (down), as
splice pads a dense MLP; ``silu(0) * 0`` adds exactly nothing. Expert parallelism is chosen as
transformers chooses it: ``DistributedConfig(ep_size=...)`` (or ``enable_expert_parallel=True``); its
rules then replace the TP rules of the expert modules. splice runs it over the tensor-parallel ranks
(``ep_size == tp_size``, the only layout without FSDP), every rank holding ``E / ep`` experts.

Each rank reads only its rows of each expert's tensors (or only its experts): the layout is ordinary
WeightMap rules on the stacked keys, composed after transformers' stacking, and
`splice.parallel.block_reads` turns the composed step into boxes of the per-expert tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from splice.errors import LoadError
from splice.parallel.layout import interleave, padded
from splice.parallel.sharding import generic
from splice.transforms import Op, Pad, Reshape
from splice.weightmap import Rule, WeightMap

__all__ = ["ExpertPlan", "ExpertsLayout", "expert_request", "install", "split_plan"]

TP_EXPERTS, PACKED, ROWWISE = "moe_tp_experts", "packed_colwise", "rowwise"
EP_EXPERTS, GROUPED = "ep_dispatch_experts", "grouped_gemm"
GRAD_ALLREDUCE = "replicated_with_grad_allreduce"
PARAM_STYLES = {PACKED, GROUPED}


@dataclass(frozen=True)
class ExpertsLayout:
    """One experts module: which parameter is gate_up and which down, and how they are cut."""

    path: str
    mode: str  # "tp" (each expert's rows cut) or "ep" (whole experts split)
    gate_up: str
    down: str
    experts: int
    hidden: int
    intermediate: int
    padded: int  # intermediate rows per part in the TP-global layout (a multiple of tp)


@dataclass
class ExpertPlan:
    """What splice does with a model's experts (and the norms whose gradients are partial)."""

    experts: list[ExpertsLayout] = field(default_factory=list)
    grad_allreduce: list[str] = field(default_factory=list)
    ep_implementation: str = "auto"

    def rules(self, tp: int) -> WeightMap:
        """Stacked expert keys -> their TP-global layout (nothing for expert parallelism: whole experts)."""
        rules = []
        for ex in self.experts:
            if ex.mode != "tp":
                continue
            gate_up, down = f"{ex.path}.{ex.gate_up}", f"{ex.path}.{ex.down}"
            size, cut = ex.intermediate, ex.padded
            ops: list[Op] = []
            if cut != size:
                # gate and up padded each: [E, 2I, H] -> [E, 2, I, H] -> [E, 2, I', H] -> [E, 2I', H]
                e, h = ex.experts, ex.hidden
                ops += [
                    Reshape((e, 2, size, h), (e, 2 * size, h)),
                    Pad(2, cut, size),
                    Reshape((e, 2 * cut, h), (e, 2, cut, h)),
                ]
                rules.append(Rule((down,), (down,), (Pad(2, cut, size),)))
            ops.append(interleave([cut, cut], tp, dim=1))
            rules.append(Rule((gate_up,), (gate_up,), tuple(ops)))
        return WeightMap.of(rules)

    def dims(self) -> dict[str, int]:
        out = {}
        for ex in self.experts:
            out[f"{ex.path}.{ex.gate_up}"] = 1 if ex.mode == "tp" else 0
            out[f"{ex.path}.{ex.down}"] = 2 if ex.mode == "tp" else 0
        return out


# --------------------------------------------------------------------------------------------------
# the request


@dataclass(frozen=True)
class EPRequest:
    size: int | None  # None: the tensor-parallel size (``enable_expert_parallel`` without ``ep_size``)
    plan: dict[str, str]
    implementation: str


def expert_request(distributed_config: Any) -> EPRequest | None:
    """Expert parallelism asked for by a transformers ``DistributedConfig`` (or its dict), or None."""
    if distributed_config is None:
        return None
    get = distributed_config.get if isinstance(distributed_config, dict) else (
        lambda name, default=None: getattr(distributed_config, name, default)
    )  # fmt: skip
    size = get("ep_size")
    if size is None and get("enable_expert_parallel"):
        size = get("tp_size") or 0  # transformers' deprecated spelling of ep_size=tp_size; 0: not given
    elif (size or 1) == 1:
        return None
    plan = get("ep_plan") or {}
    if not isinstance(plan, dict):
        raise LoadError(f"distributed_config.ep_plan must be a dict of module pattern -> style, got {plan!r}")
    return EPRequest(int(size) or None, dict(plan), get("ep_implementation") or "auto")


# --------------------------------------------------------------------------------------------------
# splitting the plan


def split_plan(
    model: nn.Module, plan: dict[str, str], ep: EPRequest | None, tp: int
) -> tuple[dict[str, str], ExpertPlan]:
    """The plan without the entries splice handles here, and what they ask for.

    With expert parallelism, the model's EP plan (with the request's overrides) replaces the TP rules of
    the expert modules and their parameters, as transformers does.
    """
    plan = dict(plan)
    result = ExpertPlan()
    if ep is not None:
        if ep.size not in (None, tp):
            raise LoadError(
                f"ep_size={ep.size} with tp_size={tp}: splice runs expert parallelism over the tensor-parallel "
                f"ranks, so ep_size must equal tp_size ({tp})"
            )
        ep_plan = {**dict(getattr(model, "ep_plan", None) or {}), **ep.plan}
        if not ep_plan:
            raise LoadError(f"expert parallelism was requested, but {type(model).__name__} has no ep_plan")
        covered = re.compile(rf"(?:{'|'.join(map(re.escape, ep_plan))})(?:\..+)?").fullmatch
        plan = {k: v for k, v in plan.items() if not covered(k)} | ep_plan
        result.ep_implementation = ep.implementation
    for key in [k for k, v in plan.items() if v == GRAD_ALLREDUCE]:
        plan[key] = "replicate"  # whole on every rank; install() sums its gradient
        result.grad_allreduce += [p for p, _ in model.named_modules() if p and generic(p) == key]

    modules = dict(model.named_modules())
    handled: set[str] = set()
    for path, module in modules.items():
        style = plan.get(generic(path)) if path else None
        if style not in (TP_EXPERTS, EP_EXPERTS):
            continue
        mode = "tp" if style == TP_EXPERTS else "ep"
        result.experts.append(_experts(path, module, plan, mode, tp))
        handled.add(generic(path))
        handled.update(f"{generic(path)}.{name}" for name, _ in module.named_parameters(recurse=False))
    stray = [
        k
        for k, v in plan.items()
        if k not in handled and (v in PARAM_STYLES or v in (TP_EXPERTS, EP_EXPERTS))
    ]
    if stray:
        raise LoadError(
            f"tp plan entry {stray[0]!r} ({plan[stray[0]]}) is not part of an experts module that the plan "
            f"shards with {TP_EXPERTS!r} or {EP_EXPERTS!r}; splice shards expert weights only there"
        )
    return {k: v for k, v in plan.items() if k not in handled}, result


def _experts(path: str, module: nn.Module, plan: dict[str, str], mode: str, tp: int) -> ExpertsLayout:
    params = dict(module.named_parameters(recurse=False))
    styles = {name: plan.get(f"{generic(path)}.{name}") for name in params}
    wanted = {PACKED: "gate_up", ROWWISE: "down"} if mode == "tp" else None
    if mode == "tp":
        found = {styles[n]: n for n in params if styles[n] in wanted}
        if set(found) != set(wanted) or len(params) != 2:
            raise LoadError(
                f"{path}: splice shards experts with one {PACKED!r} gate_up and one {ROWWISE!r} down "
                f"parameter; the plan gives {styles}"
            )
        gate_up, down = found[PACKED], found[ROWWISE]
    else:
        if set(styles.values()) != {GROUPED} or len(params) != 2 or "gate_up_proj" not in params:
            raise LoadError(
                f"{path}: splice splits experts with {GROUPED!r} gate_up_proj and down_proj; the plan gives {styles}"
            )
        gate_up, down = "gate_up_proj", next(n for n in params if n != "gate_up_proj")
    layout = {
        "is_transposed": getattr(module, "is_transposed", False),
        "is_concatenated": getattr(module, "is_concatenated", True),
        "has_bias": getattr(module, "has_bias", False),
        "has_gate": getattr(module, "has_gate", True),
    }
    if layout != {"is_transposed": False, "is_concatenated": True, "has_bias": False, "has_gate": True}:
        raise LoadError(
            f"{path}: splice shards experts stored as [E, 2I, H] gate-then-up and [E, H, I] down without "
            f"biases; this module has {layout}"
        )
    shapes = {n: tuple(params[n].shape) for n in (gate_up, down)}
    (experts, rows, hidden), down_shape = shapes[gate_up], shapes[down]
    if rows % 2 or down_shape != (experts, hidden, rows // 2):
        raise LoadError(
            f"{path}: {gate_up} is {list(shapes[gate_up])} and {down} {list(down_shape)}; expected "
            f"[E, 2I, H] and [E, H, I]"
        )
    if mode == "ep" and experts % tp:
        divisors = [d for d in range(2, experts + 1) if experts % d == 0]
        raise LoadError(
            f"{path}: {experts} experts cannot be split evenly across {tp} expert-parallel ranks; "
            f"ep_size must divide {experts} ({', '.join(map(str, divisors)) or 'only 1'})"
        )
    size = rows // 2
    cut = padded(size, tp) if mode == "tp" else size
    return ExpertsLayout(path, mode, gate_up, down, experts, hidden, size, cut)


# --------------------------------------------------------------------------------------------------
# the forwards


def install(model: nn.Module, plan: ExpertPlan, mesh: Any) -> None:
    """transformers' own forward hooks on each experts module and each gradient-summed norm, per instance."""
    from transformers.distributed.expert_parallel import EpDispatchExpertsParallel
    from transformers.distributed.tensor_parallel import MoeExpertsParallel, ReplicatedWithGradAllReduce

    modules = dict(model.named_modules())
    for ex in plan.experts:
        module = modules[ex.path]
        if ex.mode == "tp":
            MoeExpertsParallel().install_forward(module, mesh)
        else:
            module.num_experts = ex.experts // mesh.size()  # the forward then skips the other ranks' ids
            module._is_expert_parallel = True
            EpDispatchExpertsParallel().install_forward(
                module, mesh, tp_mesh=mesh, ep_implementation=plan.ep_implementation
            )
    for path in plan.grad_allreduce:
        ReplicatedWithGradAllReduce().install_forward(modules[path], mesh)
