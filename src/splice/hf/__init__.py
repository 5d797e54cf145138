"""Transformers integration: ``splice.from_pretrained`` and ``splice.save_pretrained``.

- `splice.hf.load`: loading (`from_pretrained`, and `prepare`, which the tensor-parallel loader shares).
- `splice.hf.conversions`: transformers' checkpoint renames and weight converters as WeightMap rules.
- `splice.hf.save` / `splice.hf.save_checks`: saving, and what it refuses before writing.
- `splice.hf.options` / `splice.hf.buffers`: ``state_dict=`` / ``output_loading_info=``, computed buffers.

It builds on `splice.loading` (requests, resolution, strict checks, placement) and calls
`splice.parallel` for tensor-parallel loads; neither of those imports it.
"""

from __future__ import annotations

from splice.fusion.surgery import original_state_dict
from splice.hf.load import from_pretrained
from splice.hf.save import save_pretrained

__all__ = ["from_pretrained", "save_pretrained", "original_state_dict"]
