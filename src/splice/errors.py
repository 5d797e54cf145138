"""The exceptions splice raises. Every message says what was expected, what was found, and where."""

from __future__ import annotations


class SpliceError(Exception):
    """Base class of every error splice raises on purpose."""


class TransformError(SpliceError, ValueError):
    """A tensor op cannot run, or cannot run exactly, on the tensors it was given."""


class WeightMapError(SpliceError, ValueError):
    """A weight map is malformed, conflicting, or does not fit the keys it is compiled against."""


class CheckpointError(SpliceError, OSError):
    """A checkpoint on disk is missing, corrupt, or does not hold what was asked for."""


class FusionError(SpliceError, ValueError):
    """A fusion request names an unknown family, matches nothing, or cannot be applied."""


class LoadError(SpliceError, ValueError):
    """Loading a model found a missing, unexpected or misshapen weight."""


class WeightsMismatchError(LoadError, RuntimeError):
    """The checkpoint's weights do not fit the model: a weight is missing, misshapen, or cannot be converted.

    Also a ``RuntimeError``, as transformers raises for a size mismatch or a failed weight conversion
    and ``torch.nn.Module.load_state_dict(strict=True)`` for a missing key, so code that catches those
    catches this.
    """


class MetaDeviceError(LoadError, RuntimeError):
    """``from_pretrained`` was called under a meta device context; transformers refuses it with a RuntimeError."""


class SaveError(SpliceError, ValueError):
    """A save was refused because what it would write could not be loaded back as the same model."""
