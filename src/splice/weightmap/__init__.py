"""`WeightMap`: how the keys and tensors of one checkpoint layout become those of another.

A map is a list of rules. A rule reads like the layout change it performs::

    >>> wm = WeightMap.parse([
    ...     "layers.*.attn.{q,k,v}_proj.weight -> layers.*.attn.qkv_proj.weight | concat(dim=0)",
    ...     "layers.*.mlp.{gate,up}_proj.weight -> layers.*.mlp.gate_up_proj.weight | concat(dim=0)",
    ... ])

Patterns are globs over dotted keys:
- ``*`` matches one dotted component (or part of one) and is captured; targets reuse the captures in order.
- ``**`` matches one or more components (prefix renames: ``visual.** -> model.visual.**``).
- ``#`` matches a numeric index that is *collected*: ``experts.#.w1 -> experts_w1 | stack(dim=0)`` stacks
  all experts in index order; in a target, ``#`` enumerates the outputs 0..n-1.
- ``{a,b,c}`` expands into one pattern per choice.

``compile(keys, metas)`` turns a map into a :class:`CompiledMap` of concrete steps, checking that every rule
group is complete, that no key is claimed twice and no target produced twice, and (given shapes) that
every op fits. Keys no rule claims pass through unchanged. ``CompiledMap.run`` streams one step at a time,
and ``CompiledMap.inverse()`` is exact. Maps compose (``renames.then(fusion)``) and serialize to JSON.

The package, bottom to top (each module imports only those above it in this list):

- ``patterns``: `Pattern`, brace expansion (capped at ``MAX_EXPANSION``), `compact` printing, and
  `wildcard_numbers`, the one place a layer number becomes ``*``;
- ``rules``: `Rule` and its text / JSON forms;
- ``program``: what compiling makes: a `CompiledMap` of steps (`Step`) made of instructions (`Instr`);
- ``compiler``: compiling stages against keys, composing stages, resolving op sizes;
- ``maps``: `WeightMap` and its JSON document;
- ``growth``: the bound on what a map read from a file may allocate (`check_step`, `check_compiled`).
"""

from splice.weightmap.maps import FORMAT, WeightMap
from splice.weightmap.patterns import MAX_EXPANSION, Pattern, wildcard_numbers
from splice.weightmap.program import CompiledMap, Instr, Step
from splice.weightmap.rules import Rule

__all__ = [
    "FORMAT",
    "MAX_EXPANSION",
    "CompiledMap",
    "Instr",
    "Pattern",
    "Rule",
    "Step",
    "WeightMap",
    "wildcard_numbers",
]
