"""Entity linking over Chinese text: leftmost-longest match against entity names and aliases.

Chinese has no spaces, so instead of a word segmenter the linker walks a character trie of
every surface form: at each position it takes the longest form that starts there, then jumps
past it (matches never overlap). Latin letters match case-insensitively, as BERT lowercases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

_END = ""


@dataclass(frozen=True)
class EntitySpan:
    start: int
    end: int
    text: str
    entity: str


def _fold(char: str) -> str:
    lowered = char.lower()
    return lowered if len(lowered) == 1 else char


class EntityLinker:
    def __init__(self, surface_forms: dict[str, str]):
        """``surface_forms`` maps each name or alias to its entity."""
        self._trie: dict = {}
        for form, entity in surface_forms.items():
            node = self._trie
            for char in form:
                node = node.setdefault(_fold(char), {})
            node[_END] = entity

    def link(self, text: str) -> list[EntitySpan]:
        spans = []
        start = 0
        while start < len(text):
            match = self._longest_match(text, start)
            if match is None:
                start += 1
                continue
            end, entity = match
            spans.append(EntitySpan(start, end, text[start:end], entity))
            start = end
        return spans

    def _longest_match(self, text: str, start: int) -> tuple[int, str] | None:
        node, best = self._trie, None
        for position in range(start, len(text)):
            node = node.get(_fold(text[position]))
            if node is None:
                break
            if _END in node:
                best = (position + 1, node[_END])
        return best


def span_token_positions(offsets: Sequence[tuple[int, int]], spans: Sequence[EntitySpan]) -> list[list[int]]:
    """For each span, the token positions whose character offsets overlap it.

    ``offsets`` is a tokenizer's ``offset_mapping`` for one text; special and padding tokens
    have empty ``(0, 0)`` offsets and never match.
    """
    return [[i for i, (s, e) in enumerate(offsets) if e > s and s < span.end and e > span.start] for span in spans]
