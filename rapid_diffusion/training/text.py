"""Caption text from bytes: UTF-8 (with or without a BOM), UTF-16 with a BOM, else GB18030/GBK when printable;
bounded line reading, so that no line over the limit is ever held in memory."""

from __future__ import annotations

import codecs
import io
import unicodedata
from typing import BinaryIO, Iterator


def decode_text(data: bytes, complete: bool = True) -> tuple[str, str] | None:
    """``(text, encoding)`` of caption bytes, or None when no supported encoding fits.

    UTF-8 (a BOM is dropped), UTF-16 with a BOM, else GB18030 (a superset of GBK) when the
    result is printable text: GB18030 decodes many byte strings, so garbage must not pass.
    ``complete=False`` tolerates a character cut at the end (a bounded read).
    """
    if data.startswith(codecs.BOM_UTF8):
        candidates = ("utf-8-sig",)
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates = ("utf-16",)
    else:
        candidates = ("utf-8", "gb18030")
    for encoding in candidates:
        try:
            text = codecs.getincrementaldecoder(encoding)().decode(data, final=complete)
        except UnicodeDecodeError:
            continue
        if encoding != "gb18030" or plausible_text(text):
            return text, encoding.removesuffix("-sig")
    return None


def plausible_text(text: str) -> bool:
    """Printable characters only: no controls, private-use or unassigned code points."""
    return all(ch in "\t\r\n" or unicodedata.category(ch) not in ("Cc", "Co", "Cn", "Cs") for ch in text)


class TextLines:
    """Bounded lines of one text file, decoded with one encoding for the whole file.

    Yields ``(line number, text, too_long)``; ``text`` is None for a line that does not
    decode. The encoding is fixed by a BOM, else by the first non-ASCII line (UTF-8, else
    GB18030); ``encoding`` tells which, after iteration.
    """

    def __init__(self, stream: BinaryIO, limit: int):
        self.stream = stream
        self.limit = limit
        self.encoding: str | None = None

    def __iter__(self) -> Iterator[tuple[int, str | None, bool]]:
        if head(self.stream, 2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            self.encoding = "utf-16"
            yield from self._utf16_lines()
            return
        for number, raw, too_long in bounded_lines(self.stream, self.limit):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, self.encoding = raw[len(codecs.BOM_UTF8):], "utf-8"
            yield number, self._decode(raw), too_long

    def _decode(self, raw: bytes) -> str | None:
        if self.encoding is None:
            if raw.isascii():
                return raw.decode("ascii")
            decoded = decode_text(raw)
            if decoded is None:
                return None
            self.encoding = decoded[1]
            return decoded[0]
        try:
            return raw.decode(self.encoding)
        except UnicodeDecodeError:
            return None

    def _utf16_lines(self) -> Iterator[tuple[int, str | None, bool]]:
        reader = io.TextIOWrapper(self.stream, encoding="utf-16")
        number = 0
        try:
            while line := reader.readline(self.limit + 1):
                number += 1
                too_long = len(line) > self.limit and not line.endswith("\n")
                while too_long and line and not line.endswith("\n"):
                    line = reader.readline(1 << 20)
                yield number, "" if too_long else line, too_long
        except UnicodeDecodeError:
            yield number + 1, None, False
        finally:
            reader.detach()


def head(stream: BinaryIO, size: int) -> bytes:
    """The stream's first bytes, left unread."""
    if hasattr(stream, "peek"):
        return stream.peek(size)[:size]
    head = stream.read(size)
    stream.seek(0)
    return head


def bounded_lines(stream: BinaryIO, limit: int) -> Iterator[tuple[int, bytes, bool]]:
    """``(line number, raw bytes, too_long)``; a line over ``limit`` bytes is skipped without being held."""
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(1 << 20)
            yield number, b"", True
            continue
        yield number, raw, False
