"""seq_file: the buffer a show function prints into (fs/seq_file.c)."""

from __future__ import annotations


class SeqFile:
    """What a /proc or module show function writes; `text` is what a reader gets."""

    __slots__ = ("_parts", "private")

    def __init__(self, private: object = None) -> None:
        self._parts: list[str] = []
        self.private = private

    def puts(self, text: str) -> None:
        self._parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self._parts)
