"""Key paths: where a setting is in a recipe, as a tuple and as `--set` writes it (dots)."""

from __future__ import annotations

from collections.abc import Iterable


class KeyPath(tuple):
    """A recipe key path: ("stages", "merge", "models", 1, "parameters", "weight"), written
    `stages.merge.models.1.parameters.weight`. List indices are ints, as YAML and pydantic give
    them; `KeyPath.of` reads a dotted string (digits become indices) or any sequence of keys."""

    __slots__ = ()

    @classmethod
    def of(cls, value: str | Iterable[str | int] | None) -> KeyPath:
        if value is None or value == "":
            return cls()
        if isinstance(value, KeyPath):
            return value
        parts = value.split(".") if isinstance(value, str) else value
        return cls(
            int(part) if isinstance(part, str) and part.isdigit() else part
            for part in parts
            if part != ""
        )

    def __add__(self, other: Iterable[str | int]) -> KeyPath:
        return KeyPath((*self, *KeyPath.of(other)))

    def __radd__(self, other: Iterable[str | int]) -> KeyPath:
        return KeyPath((*KeyPath.of(other), *self))

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return KeyPath(item) if isinstance(index, slice) else item

    def __str__(self) -> str:
        return ".".join(str(part) for part in self)

    def __repr__(self) -> str:
        return f"KeyPath({str(self)!r})"
