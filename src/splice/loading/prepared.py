"""`Prepared`: a model built on meta (and fused), with the map from the checkpoint's keys to its keys.

A loader builds one (`splice.hf.load.prepare`), compiles its plan against the checkpoint (`compile`:
the strict check, and each target's dtype), places the tensors (`splice.loading.place`), then calls
`finish` (ties, the generation config, eval mode). The tensor-parallel loader uses the same object.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.checkpoint import CheckpointReader
from splice.errors import LoadError, WeightMapError, WeightsMismatchError
from splice.loading.resolve import load_generation_config
from splice.loading.strict import check_plan, few, ignored_unexpected, meta_keys, needed_steps
from splice.transforms import TensorMeta
from splice.weightmap import CompiledMap, WeightMap

logger = logging.getLogger("splice")


class Prepared:
    """A model built on meta and fused, with everything needed to compile and run its load plan."""

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        weight_map: WeightMap,
        target_dtype: torch.dtype | None,
        dtype_plan: dict[str, torch.dtype],
        transforms: list[Any],
        missing_ok: set[str],
        device: torch.device | None,
        source: Any = None,
    ):
        self.model, self.path, self.weight_map = model, Path(path), weight_map
        self.target_dtype, self.dtype_plan, self.transforms = target_dtype, dtype_plan, transforms
        self.missing_ok, self.device = missing_ok, device
        self.source = source  # a reader of weights given in memory (state_dict=), else None: the files
        self.dtypes: dict[str, torch.dtype] = {}
        self.unexpected: list[str] = []

    def open(self) -> Any:
        """The reader of the weights: the checkpoint's files, or the state dict given."""
        return CheckpointReader(self.path) if self.source is None else self.source

    def compile(self, reader: CheckpointReader) -> CompiledMap:
        """The checkpoint -> runtime plan, checked strictly against the model's own tensors."""
        metas = reader.metas()
        try:
            plan = self.weight_map.compile(list(metas), metas)
        except WeightMapError as exc:
            raise WeightsMismatchError(
                f"{self.path}: the checkpoint does not fit the requested layout: {exc}"
            ) from None
        expected = {k: TensorMeta.of(t) for k, t in self.model.state_dict(keep_vars=True).items()}
        extra = check_plan(plan, expected, self.missing_ok, self.path)
        self.unexpected = [k for k in extra if not ignored_unexpected(self.model, k)]
        if self.unexpected:
            logger.warning(
                "%s: ignoring %d checkpoint key(s) the model has no place for: %s",
                self.path,
                len(self.unexpected),
                few(self.unexpected),
            )
        steps = needed_steps(plan, expected)
        produced = plan.target_metas
        for step in steps:
            for key in step.targets:
                if key in expected:
                    self.dtypes[key] = self._dtype_for(key, produced[key].dtype)
        return CompiledMap(steps, plan.unclaimed, plan.unused_rules)

    def _dtype_for(self, key: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point or self.target_dtype is None:
            return stored
        for pattern, dtype in self.dtype_plan.items():
            if re.search(pattern, key):
                return dtype
        return self.target_dtype

    def finish(self) -> nn.Module:
        """Tie weights, check that nothing is left on meta, set the generation config; the model in eval mode."""
        model = self.model
        model._weight_conversions = [t for t in self.transforms if t.was_used()]
        model.tie_weights(missing_keys=set(self.missing_ok) & meta_keys(model), recompute_mapping=False)
        left = sorted(meta_keys(model))
        if left:
            raise LoadError(f"{self.path}: no value for {few(left)} after loading (please report this)")
        load_generation_config(model, self.path if self.source is None else None)
        model.eval()
        return model
