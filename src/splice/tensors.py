"""`TensorMeta`: a tensor's shape and dtype without its data; the ground every layer stands on.

It imports only torch, so the checkpoint format, the ops of `splice.transforms` and the weight map
compiler all describe tensors with the same type without importing one another.

>>> import torch
>>> meta = TensorMeta.of(torch.zeros(3, 4, dtype=torch.bfloat16))
>>> print(meta, meta.numel, meta.nbytes)
bfloat16[3, 4] 12 24
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["TensorMeta"]


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor, without its data (from a safetensors header or a meta tensor)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorMeta:
        return cls(tuple(tensor.shape), tensor.dtype)

    def empty(self, device: str | torch.device = "meta") -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)

    def __str__(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')}{list(self.shape)}"
