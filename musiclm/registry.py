"""A registry by name: ``type:`` in a config section -> the builder (or class) that makes it.

Used for acoustic tokenizers (:mod:`musiclm.codec`), semantic feature types
(:mod:`musiclm.semantic`) and audio/text embedders (:mod:`musiclm.mulan`)::

    ACOUSTIC = Registry("acoustic tokenizer")

    @ACOUSTIC.register("soundstream")
    def _soundstream(cfg: dict, device: str) -> AcousticTokenizer: ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries, in registration order; registering a name twice is an error."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that files the decorated builder or class under ``name``."""

        def deco(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.what} type {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return deco

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        """The entry of ``name``; unknown names raise ValueError listing the known ones."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} type {name!r} (known: {', '.join(self._entries)})")
        return self._entries[name]
