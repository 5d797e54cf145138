"""The error `splice.peft` raises when an adapter or a LoRA config cannot be mapped exactly."""

from __future__ import annotations

from splice.errors import SpliceError


class AdapterError(SpliceError, ValueError):
    """A LoRA config or adapter cannot be put onto this model, or taken off it, without changing its outputs."""
