"""`gate_up`: the gate and up projections of a gated MLP become one `gate_up_proj` ([gate; up] rows).

The row order matches the checkpoints that ship this layout natively (Phi-3), and the mechanism is
the one `qkv` uses (`splice.fusion.linear`): `act(gate_proj(x)) * up_proj(x)` still reads as written
and costs one GEMM.
"""

from __future__ import annotations

from typing import ClassVar

from splice.fusion.linear import SiblingLinearsSpec
from splice.fusion.spec import register_fusion


class GateUpSpec(SiblingLinearsSpec):
    name: ClassVar[str] = "gate_up"
    candidate_names: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("gate_proj", "up_proj"),
        ("w1", "w3"),
        ("wi_0", "wi_1"),
    )
    fused_name: ClassVar[str] = "gate_up_proj"


register_fusion("gate_up", GateUpSpec())
