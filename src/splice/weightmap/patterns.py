"""Key patterns: `Pattern` (globs over dotted keys), brace expansion with its cap, printing several
patterns as one, and the one helper that turns layer numbers into ``*``.

>>> Pattern("layers.*.mlp.experts.#.w1").match("layers.3.mlp.experts.7.w1")
(('3',), 7)
>>> expand_braces("attn.{q,k,v}_proj.weight")
['attn.q_proj.weight', 'attn.k_proj.weight', 'attn.v_proj.weight']
>>> compact(['attn.q_proj.weight', 'attn.k_proj.weight'])
'attn.{q,k}_proj.weight'
>>> wildcard_numbers("model.layers.12.mlp.experts.3.w1")
'model.layers.*.mlp.experts.*.w1'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from splice.errors import WeightMapError

__all__ = ["MAX_EXPANSION", "WILDCARD", "Pattern", "compact", "expand_braces", "numbers", "wildcard_numbers"]

WILDCARD = re.compile(r"\*\*|\*|#")


@dataclass(frozen=True)
class Pattern:
    """A glob over dotted keys. Captures are ``*``/``**`` (kept) and ``#`` (a collected index)."""

    text: str

    def __post_init__(self) -> None:
        if not self.text or any(c in self.text for c in "{},|") or "->" in self.text:
            raise WeightMapError(f"bad key pattern {self.text!r}")
        if self.text.count("#") > 1:
            raise WeightMapError(f"pattern {self.text!r}: at most one '#' (collected index) per pattern")
        # Two wildcards in one component (``*a*a*``), or two ``**``, make the match ambiguous, and a regex
        # engine then tries every split of a key: a map read from a file could stall for hours on one key.
        if self.text.count("**") > 1:
            raise WeightMapError(f"pattern {self.text!r}: at most one '**' per pattern")
        crowded = [part for part in self.text.split(".") if len(WILDCARD.findall(part)) > 1]
        if crowded:
            raise WeightMapError(
                f"pattern {self.text!r}: at most one wildcard ('*', '**' or '#') per dotted component, "
                f"found {crowded[0]!r}"
            )

    @property
    def tokens(self) -> list[str]:
        return WILDCARD.findall(self.text)

    @property
    def captures(self) -> int:
        """Number of kept captures (``*`` and ``**``)."""
        return sum(t != "#" for t in self.tokens)

    @property
    def collects(self) -> bool:
        return "#" in self.text

    @property
    def literal(self) -> bool:
        return not self.tokens

    @property
    def regex(self) -> re.Pattern[str]:
        parts, pos = [], 0
        for m in WILDCARD.finditer(self.text):
            parts.append(re.escape(self.text[pos : m.start()]))
            parts.append({"**": r"(.+)", "*": r"([^.]+)", "#": r"(\d+)"}[m.group()])
            pos = m.end()
        parts.append(re.escape(self.text[pos:]))
        return _compiled("".join(parts))

    def match(self, key: str) -> tuple[tuple[str, ...], int | None] | None:
        """``(kept captures, collected index or None)`` when ``key`` matches, else None."""
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        kept, index = [], None
        for token, value in zip(self.tokens, m.groups()):
            if token == "#":
                index = int(value)
            else:
                kept.append(value)
        return tuple(kept), index

    def fill(self, captures: Sequence[str], index: int | None = None) -> str:
        values = iter(captures)
        out, pos = [], 0
        for m in WILDCARD.finditer(self.text):
            out.append(self.text[pos : m.start()])
            if m.group() == "#":
                if index is None:
                    raise WeightMapError(f"pattern {self.text!r} needs an index to fill '#'")
                out.append(str(index))
            else:
                out.append(next(values))
            pos = m.end()
        out.append(self.text[pos:])
        return "".join(out)

    def __str__(self) -> str:
        return self.text


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _compiled(regex: str) -> re.Pattern[str]:
    pattern = _REGEX_CACHE.get(regex)
    if pattern is None:
        pattern = _REGEX_CACHE[regex] = re.compile(regex)
    return pattern


MAX_EXPANSION = 4096
"""Most patterns one brace pattern may expand into. ``{a,b}`` repeated 40 times would be 2**40 of them."""

_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(text: str) -> list[str]:
    """``a.{q,k}.{w,b}`` -> ``a.q.w, a.q.b, a.k.w, a.k.b``, innermost braces first; each step is counted
    before it is taken, so a brace bomb is refused after at most ``MAX_EXPANSION`` patterns of work."""
    done, pending = [], [text.strip()]
    work = 0  # characters written, so that many single-choice braces in a long text are bounded too
    while pending:
        m = _BRACES.search(pending[0])
        if m is None:
            done.append(pending.pop(0))
            continue
        choices = m.group(1).split(",")
        work += len(choices) * len(pending[0])
        if len(done) + len(pending) - 1 + len(choices) > MAX_EXPANSION or work > 1000 * MAX_EXPANSION:
            raise WeightMapError(
                f"pattern {_shown(text)} expands into more than {MAX_EXPANSION} patterns; "
                "write a '*' or '#' wildcard instead of so many braces"
            )
        first = pending.pop(0)
        pending[:0] = [(first[: m.start()] + c.strip() + first[m.end() :]).strip() for c in choices]
    return done


def _shown(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3]) + "..."


def compact(patterns: Sequence[str]) -> str:
    """Print several patterns as one brace pattern when they differ only in the middle of a component."""
    if len(patterns) < 2:
        return ", ".join(patterns)
    prefix = _common_prefix(patterns)
    suffix = _common_prefix([p[len(prefix) :][::-1] for p in patterns])[::-1]
    middles = [p[len(prefix) : len(p) - len(suffix)] for p in patterns]
    if all(m and "." not in m and not WILDCARD.search(m) for m in middles):
        return f"{prefix}{{{','.join(middles)}}}{suffix}"
    return ", ".join(patterns)


def _common_prefix(texts: Sequence[str]) -> str:
    first, last = min(texts), max(texts)  # what the smallest and largest share, every text shares
    for i, c in enumerate(first):
        if last[i] != c:
            return first[:i]
    return first


NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")
"""A numeric dotted component (a layer, expert or block index): ``12`` in ``model.layers.12.mlp``."""


def numbers(key: str) -> tuple[str, ...]:
    """The numeric dotted components of ``key``, in order: ``("12", "3")`` for ``layers.12.experts.3.w1``."""
    return tuple(NUMBER.findall(key))


def wildcard_numbers(key: str) -> str:
    """``key`` with every numeric dotted component as ``*``: one name for a module or tensor of every layer."""
    return NUMBER.sub("*", key)
