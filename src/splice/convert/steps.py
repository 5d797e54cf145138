"""Running one compiled step of ``splice convert``: reading its sources into one reused buffer, straight into
their place in the result when the op is a concat or stack, piece by piece when it is a split along the
first dim, and handing the results to the writer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from splice.checkpoint import CheckpointReader
from splice.errors import WeightMapError
from splice.tensors import TensorMeta
from splice.transforms import Split, Unstack
from splice.weightmap import Step

__all__ = ["Scratch", "run_step"]

Write = Callable[[str, torch.Tensor], None]


def run_step(step: Step, reader: CheckpointReader, write: Write, scratch: Scratch) -> None:
    """Read the step's sources, run its ops, write its targets; ``write`` is done with a tensor on return."""
    if step.source_metas is None or step.target_metas is None:
        raise WeightMapError(f"{step}: compiled without shapes; convert compiles every map with the source's")
    ops = step.ops
    op = ops[0] if ops is not None and len(ops) == 1 else None
    if ops == ():  # a rename, or a key passed through
        for source, target, meta in zip(step.sources, step.targets, step.source_metas):
            write(target, reader.read_into(source, scratch.take([meta])[0]))
    elif hasattr(op, "input_views") and len(step.targets) == 1:
        # concat / stack / conv_to_linear: read every source straight into its place in the result
        [out] = scratch.take(step.target_metas)
        for source, view in zip(step.sources, op.input_views(out), strict=True):
            reader.read_into(source, view)
        write(step.targets[0], out)
    elif isinstance(op, (Split, Unstack)) and op.dim in (0, -len(step.source_metas[0].shape)):
        # a split along the first dim: read each piece on its own, one contiguous run of the file
        if isinstance(op, Split):
            starts = [sum(op.sizes[:i]) for i in range(len(op.sizes) + 1)]
            pieces = [slice(a, b) for a, b in zip(starts, starts[1:])]
        else:
            pieces = list(range(len(step.targets)))
        for target, meta, piece in zip(step.targets, step.target_metas, pieces, strict=True):
            write(target, reader.read_into(step.sources[0], scratch.take([meta])[0], piece))
    else:
        sources = scratch.take(step.source_metas)
        for key, tensor in zip(step.sources, sources):
            reader.read_into(key, tensor)
        for target, tensor in zip(step.targets, step.run(sources)):
            write(target, tensor)


class Scratch:
    """One buffer that every step reads into in turn.

    Touching fresh memory is slow (each new page faults in, and a large free hands pages back to the
    system), so a tensor allocated per step can cost more than its copy. The buffer is sized for the
    largest step up front but only the pages actually used become resident.
    """

    ALIGN = 64

    def __init__(self, steps: list[Step]):
        need = [
            sum(map(self._span, metas)) for s in steps for metas in (s.source_metas, s.target_metas) if metas
        ]
        self._buffer = torch.empty(max(need, default=0), dtype=torch.uint8)

    def _span(self, meta: TensorMeta) -> int:
        return -(-meta.nbytes // self.ALIGN) * self.ALIGN

    def take(self, metas: tuple[TensorMeta, ...] | list[TensorMeta]) -> list[torch.Tensor]:
        """Tensors of these shapes and dtypes side by side in the buffer, valid until the next call."""
        out, offset = [], 0
        for meta in metas:
            raw = self._buffer[offset : offset + meta.nbytes]
            out.append(raw.view(meta.dtype).view(meta.shape))
            offset += self._span(meta)
        return out
