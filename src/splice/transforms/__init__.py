"""Reversible tensor ops.

An op is a small, printable, JSON-serializable value that turns a list of tensors into another
list of tensors, and knows its exact inverse::

    >>> import torch
    >>> from splice.transforms import Concat, TensorMeta, bitwise_equal
    >>> op = Concat(dim=0)
    >>> q, k, v = torch.randn(64, 32), torch.randn(16, 32), torch.randn(16, 32)
    >>> [qkv] = op.apply([q, k, v])
    >>> op = op.resolve([TensorMeta.of(t) for t in (q, k, v)])     # fills in sizes=(64, 16, 16)
    >>> print(op, "<->", op.inverted())
    concat(dim=0, sizes=(64, 16, 16)) <-> split(dim=0, sizes=(64, 16, 16))
    >>> all(bitwise_equal(a, b) for a, b in zip(op.inverse([qkv]), [q, k, v]))
    True

Rules every op follows:
- ``inverted().apply(apply(x))`` is bitwise ``x``. An op that cannot guarantee that for a given input
  (absorbing a scale that does not divide back exactly, dropping padding that is not zero, merging
  replicas that differ) raises :class:`TransformError` naming what would be lost.
- Ops never change dtype.
- Shapes propagate without data: :meth:`Op.infer` runs the op on meta tensors, so plans can be made
  from safetensors headers alone.
- Some ops learn a size from their input (``Concat`` its ``sizes``, ``ConvToLinear`` its ``kernel``).
  :meth:`Op.resolve` fills those in from input shapes; only a resolved op can be inverted.
"""

from splice.tensors import TensorMeta
from splice.transforms.base import (
    Op,
    apply_ops,
    bitwise_equal,
    infer_ops,
    invert_ops,
    op_from_dict,
    parse_op,
    resolve_ops,
)
from splice.transforms.blocks import (
    DedupBlocks,
    DropZeros,
    InsertZeros,
    Pad,
    PermuteBlocks,
    Reorder,
    RepeatBlocks,
    Unpad,
)
from splice.transforms.interleave import Deinterleave, Interleave
from splice.transforms.layout import (
    Concat,
    ConvToLinear,
    LinearToConv,
    Reshape,
    Split,
    Stack,
    Transpose,
    Unstack,
)
from splice.transforms.scale import AbsorbScale, UnabsorbScale

__all__ = [
    "TensorMeta",
    "Op",
    "Concat",
    "Split",
    "Stack",
    "Unstack",
    "ConvToLinear",
    "LinearToConv",
    "Transpose",
    "Reshape",
    "PermuteBlocks",
    "Reorder",
    "Interleave",
    "Deinterleave",
    "RepeatBlocks",
    "DedupBlocks",
    "Pad",
    "Unpad",
    "InsertZeros",
    "DropZeros",
    "AbsorbScale",
    "UnabsorbScale",
    "bitwise_equal",
    "op_from_dict",
    "parse_op",
    "apply_ops",
    "infer_ops",
    "resolve_ops",
    "invert_ops",
]
