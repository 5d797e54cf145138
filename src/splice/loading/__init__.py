"""The loading layer: what every way of loading a Transformers checkpoint shares, below `splice.hf` and `splice.parallel`.

- `splice.loading.request`: `LoadRequest`, one ``from_pretrained`` call's arguments, checked once.
- `splice.loading.resolve`: path, config, model class, dtype and device; `build_on_meta`; the configs a
  save writes (`save_configs`) and the generation config a load reads.
- `splice.loading.prepared`: `Prepared`, a model built on meta and fused with the map from the checkpoint
  to it; its `compile` is the strict check (`splice.loading.strict`), its `finish` the last step.
- `splice.loading.place`: reading a plan step (`load_step`), placing a tensor in the model (`set_tensor`),
  and the source checkpoint's file split (`remember_source`), shared by the single-process and TP loaders.
- `splice.loading.distributed`: the `DistributedWeights` interface a sharded model's saver implements,
  and `distributed_weights`, the one lookup ``save_pretrained`` uses.

It imports neither `splice.hf` (transformers' conversions, saving) nor `splice.parallel` (which build on it),
and not `splice.fusion`: a loader fuses the model before handing it here.
"""
