"""Model names in their three spellings, and the regex that swaps one model's name for another's.

A model has a snake name (``gpt_neox``, from its folder), a cased name (``GPTNeoX``, the prefix of its
classes) and an UPPER name (``GPT_NEOX``). The cased name cannot be derived from the snake one by rule,
so it is read from the package's ``CONFIG_MAPPING_NAMES`` table when there is one (parsed, never
imported), and inferred from the class names of the files at hand otherwise.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from pathlib import Path

from splice.modular.resolve import check_source, read_source

# Files that may hold the model-type -> config-class table, relative to a `models/` folder.
_MAPPING_FILES = ("auto/auto_mappings.py", "auto/configuration_auto.py")


@functools.lru_cache(maxsize=16)
def config_mapping(models_dir: Path) -> dict[str, str]:
    """``{"gpt_neox": "GPTNeoXConfig", ...}`` read statically from ``models_dir/auto``; empty if absent."""
    table: dict[str, str] = {}
    for relative in _MAPPING_FILES:
        path = models_dir / relative
        if not path.is_file():
            continue
        tree = check_source(read_source(path), path)
        for statement in tree.body:
            if "CONFIG_MAPPING_NAMES" not in ast.unparse(statement)[:200]:
                continue
            for node in ast.walk(statement):
                pairs: list[tuple[ast.AST, ast.AST]] = []
                if isinstance(node, ast.Tuple) and len(node.elts) == 2:
                    pairs.append((node.elts[0], node.elts[1]))
                elif isinstance(node, ast.Dict):
                    pairs.extend((k, v) for k, v in zip(node.keys, node.values, strict=True) if k is not None)
                for key, value in pairs:
                    if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                        if isinstance(key.value, str) and isinstance(value.value, str):
                            table[key.value] = value.value
    return table


class NameBook:
    """Converts model names between snake and cased spellings for one package."""

    def __init__(self, mapping: dict[str, str]):
        self.to_cased_table = {
            k: v.removesuffix("Config") for k, v in mapping.items() if v.endswith("Config")
        }
        self.to_snake_table = {v: k for k, v in self.to_cased_table.items()}

    def cased(self, snake: str, class_names: set[str] = frozenset()) -> str:
        """``olmo2`` -> ``Olmo2``: from the table, else the prefix the class names use, else title case."""
        for key in (snake, snake.replace("_", "-")):
            if key in self.to_cased_table:
                return self.to_cased_table[key]
        inferred = _infer_cased(snake, class_names)
        return inferred or "".join(part.title() for part in snake.split("_"))

    def snake(self, cased: str) -> str:
        if cased in self.to_snake_table:
            return self.to_snake_table[cased]
        return "_".join(part.lower() for part in re.findall(r"[A-Z][^A-Z]*", cased))


def _infer_cased(snake: str, class_names: set[str]) -> str | None:
    """The most common class-name prefix that spells ``snake`` without its underscores."""
    key = snake.replace("_", "").lower()
    if not key:
        return None
    votes: Counter[str] = Counter()
    for name in class_names:
        prefix = name[: len(key)]
        if prefix.lower() == key and (
            len(name) == len(key) or name[len(key)].isupper() or name[len(key)] == "_"
        ):
            votes[prefix] += 1
    return votes.most_common(1)[0][0] if votes else None


class NameSwap:
    """Replaces one model's name by another's in text, keeping the spelling (cased, snake or UPPER).

    ``llama -> olmo2``, ``Llama -> Olmo2``, ``LLAMA -> OLMO2``. A match must not follow a letter or digit,
    so ``xllama`` stays; any other casing of the old name (``LLaMa``) becomes the new cased name.
    In identifiers a snake name followed by more lowercase letters stays too (``use_mambapy``).
    """

    def __init__(self, old_snake: str, new_snake: str, old_cased: str, new_cased: str):
        old_snake, new_snake = old_snake.replace("-", "_"), new_snake.replace("-", "_")
        self.old_snake, self.new_snake = old_snake, new_snake
        self.old_cased, self.new_cased = old_cased, new_cased
        self.patterns = {old_snake: new_snake, old_snake.upper(): new_snake.upper(), old_cased: new_cased}
        alternatives = "|".join(re.escape(key) for key in self.patterns)
        self._regex = re.compile(f"(?<![a-z0-9])({alternatives})(.|$)", re.IGNORECASE | re.DOTALL)
        # Old models spelled all UPPER (`GPTJ`): the next character decides between the cased and UPPER forms.
        self._upper_cased = len(self.patterns) == 2
        self._needle_snake, self._needle_cased = old_snake.lower(), old_cased.lower()

    def _replace(self, match: re.Match[str], identifier: bool = False) -> str:
        found, following = match.group(1), match.group(2)
        if identifier and found.islower() and following.islower() and following.isalpha():
            return match.group(0)  # `mamba` in the identifier `use_mambapy` is part of another word
        replacement = self.patterns.get(found, self.new_cased)
        if self._upper_cased and found.isupper() and not following.isalpha():
            replacement = self.patterns[found.lower()].upper()
        return replacement + following

    def __call__(self, text: str, identifier: bool = False) -> str:
        """``text`` renamed; in an ``identifier``, a snake name glued to more lowercase letters is
        another word and stays (strings and comments are renamed regardless)."""
        lowered = text.lower()
        if self._needle_snake not in lowered and self._needle_cased not in lowered:
            return text
        if identifier:
            return self._regex.sub(lambda match: self._replace(match, identifier=True), text)
        return self._regex.sub(self._replace, text)

    @property
    def is_identity(self) -> bool:
        return self.old_snake == self.new_snake and self.old_cased == self.new_cased
