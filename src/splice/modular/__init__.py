"""``splice modular``: flatten a transformers-style ``modular_<name>.py`` into standalone files."""

from splice.modular.convert import convert_file
from splice.modular.errors import ModularError

__all__ = ["ModularError", "convert_file"]
