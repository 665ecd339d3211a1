"""Image-text pairs for fine-tuning, and the checker that says which items are usable and why.

Three formats are read:

* uploaded images with captions (typed per image, or a ``.txt`` beside each image),
* a folder or a zip with ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line),
* EasyNLP TSV rows ``idx<TAB>text<TAB>imgbase64``.

Everything is checked before it is decoded: file and field sizes, the image header's pixel
count (decompression bombs), zip entry names (absolute, ``..``, ``.``, symlinks, duplicates),
encryption, compression methods and ratios (zip bombs). Zip entries are read one by one into
memory; nothing is extracted. Captions are UTF-8 (with or without a BOM), else UTF-16 with a
BOM or GB18030/GBK, decoded and noted per file; anything else is rejected. Every problem of
an item is reported by name (file name, or TSV row and idx) with a Chinese and an English
reason; nothing in a file raises.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import lzma
import stat
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from .pairs import NOTE_CODES, DataLimits, DataReport, Issue, Pair
from .text import TextLines, decode_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TSV_SUFFIXES = (".tsv",)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")
METADATA_NAME = "metadata.jsonl"
# Methods this Python can inflate; any other raises NotImplementedError on read.
ZIP_METHODS = {zipfile.ZIP_STORED: "store", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}
# What reading a hostile zip entry can raise besides OSError (corrupt streams, lying headers).
ZIP_READ_ERRORS = (zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError, RuntimeError, NotImplementedError, ValueError)


class _Checker:
    """Accumulates pairs, issues and notes, rejecting duplicates as it goes."""

    def __init__(self, limits: DataLimits):
        self.limits = limits
        self.report = DataReport()
        self._first_by_hash: dict[str, str] = {}
        self._pairs_seen: set[tuple[str, str]] = set()
        self._seen = 0

    def reject(self, item: str, code: str, detail: str = "") -> None:
        self.report.issues.append(Issue(item, code, detail))

    def note(self, item: str, encoding: str) -> None:
        if encoding in NOTE_CODES:
            self.report.notes.append(Issue(item, NOTE_CODES[encoding]))

    def room_left(self, item: str) -> bool:
        self._seen += 1
        if self._seen > self.limits.max_items:
            if self._seen == self.limits.max_items + 1:
                self.reject(item, "too_many", f"max {self.limits.max_items}")
            return False
        return True

    def add(self, item: str, text: str | None, data: bytes) -> None:
        """Add a pair, or report every problem of its caption and its image."""
        caption = (text or "").strip()
        size, image_problem = self._inspect_image(data)
        problems = self._caption_problems(caption) + ([image_problem] if image_problem else [])
        for code, detail in problems:
            self.reject(item, code, detail)
        if problems:
            return
        digest = hashlib.sha256(data).hexdigest()
        if (digest, caption) in self._pairs_seen:
            return self.reject(item, "duplicate_pair", f"same as {self._first_by_hash[digest]}")
        if digest in self._first_by_hash:
            return self.reject(item, "duplicate_image", f"same as {self._first_by_hash[digest]}")
        self._first_by_hash[digest] = item
        self._pairs_seen.add((digest, caption))
        self.report.pairs.append(Pair(item, caption, data, size, digest))

    def _caption_problems(self, caption: str) -> list[tuple[str, str]]:
        if not caption:
            return [("missing_caption", "")]
        if len(caption) > self.limits.max_caption_chars:
            return [("caption_too_long", f"{len(caption)} > {self.limits.max_caption_chars} chars")]
        return []

    def _inspect_image(self, data: bytes) -> tuple[tuple[int, int] | None, tuple[str, str] | None]:
        """``(size, None)`` for a usable image, else ``(None, (code, detail))``; decodes only within limits."""
        limits = self.limits
        if not data:
            return None, ("empty_file", "")
        if len(data) > limits.max_file_bytes:
            return None, ("oversized", f"{len(data)} bytes > {limits.max_file_bytes}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
                    if width * height > limits.max_pixels:
                        return None, ("bomb", f"{width}x{height} > {limits.max_pixels} pixels")
                    img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return None, ("bomb", str(exc)[:80])
        except UnidentifiedImageError:
            return None, ("undecodable", "")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            return None, ("truncated" if "truncated" in str(exc).lower() else "undecodable", str(exc)[:80])
        if min(width, height) < limits.min_side:
            return None, ("too_small", f"{width}x{height} < {limits.min_side} px")
        return (width, height), None


def check_path(path: Path, limits: DataLimits | None = None) -> DataReport:
    """Check a dataset given as a folder, a zip, a TSV, or a single image; dispatch on its kind."""
    path = Path(path)
    checker = _Checker(limits or DataLimits.from_env())
    if path.is_symlink():
        checker.reject(path.name, "symlink")
    elif path.is_dir():
        _check_folder(checker, path)
    elif not path.is_file():
        checker.reject(str(path), "missing_file")
    elif path.stat().st_size == 0:
        checker.reject(path.name, "empty_file")
    elif path.suffix.lower() == ".zip":
        _check_zip(checker, path)
    elif path.suffix.lower() in TSV_SUFFIXES:
        with path.open("rb") as stream:
            _check_tsv(checker, stream, path.name)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        _check_uploaded_image(checker, path, _sidecar_caption(checker, path))
    else:
        checker.reject(path.name, "unsupported", path.suffix or "no suffix")
    return checker.report


def check_uploads(files: Iterable[Path], captions: dict[str, str] | None = None, limits: DataLimits | None = None) -> DataReport:
    """Uploaded files: images (captioned by ``captions[file name]`` or a ``.txt`` beside them), zips, TSVs.

    ``.txt`` files among the uploads caption the image with the same stem.
    """
    files = [Path(f) for f in files]
    checker = _Checker(limits or DataLimits.from_env())
    sidecars = {f.stem: f for f in files if f.suffix.lower() == ".txt"}
    captions = captions or {}
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            continue
        if suffix in IMAGE_SUFFIXES:
            text = captions.get(path.name)
            if text is None and path.stem in sidecars:
                text = _read_caption_file(checker, sidecars[path.stem])
            _check_uploaded_image(checker, path, text)
        else:
            sub = check_path(path, checker.limits)
            for pair in sub.pairs:
                checker.add(pair.item, pair.text, pair.image_bytes)
            checker.report.issues.extend(sub.issues)
            checker.report.notes.extend(sub.notes)
    return checker.report


def _check_uploaded_image(checker: _Checker, path: Path, text: str | None) -> None:
    if not checker.room_left(path.name):
        return
    if path.stat().st_size > checker.limits.max_file_bytes:
        return checker.reject(path.name, "oversized", f"{path.stat().st_size} bytes")
    checker.add(path.name, text, path.read_bytes())


def _sidecar_caption(checker: _Checker, image: Path) -> str | None:
    sidecar = image.with_suffix(".txt")
    return _read_caption_file(checker, sidecar) if sidecar.is_file() and not sidecar.is_symlink() else None


def _read_caption_file(checker: _Checker, path: Path) -> str | None:
    with path.open("rb") as stream:
        data = stream.read(_caption_read_limit(checker.limits) + 1)
    return _caption_from_bytes(checker, path.name, data)


def _caption_read_limit(limits: DataLimits) -> int:
    """Enough bytes to tell a caption is too long, in any supported encoding."""
    return limits.max_caption_chars * 4 + 4


def _caption_from_bytes(checker: _Checker, name: str, data: bytes) -> str | None:
    """A sidecar's caption; an empty or undecodable sidecar is reported by its own name."""
    if not data:
        return checker.reject(name, "empty_file")
    decoded = decode_text(data, complete=len(data) <= _caption_read_limit(checker.limits))
    if decoded is None:
        return checker.reject(name, "bad_encoding")
    checker.note(name, decoded[1])
    return decoded[0]


def _check_folder(checker: _Checker, root: Path) -> None:
    root = root.resolve()
    metadata = root / METADATA_NAME
    if metadata.is_file():
        if metadata.stat().st_size == 0:
            return checker.reject(METADATA_NAME, "empty_file")
        with metadata.open("rb") as stream:
            for item, name, text in _metadata_rows(checker, stream):
                _check_folder_member(checker, root, name, text)
        return
    for path in sorted(root.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            _check_folder_member(checker, root, path.name, _sidecar_caption(checker, path) if path.is_file() else None)


def _check_folder_member(checker: _Checker, root: Path, name: str, text: str | None) -> None:
    if not checker.room_left(name):
        return
    problem = _name_problem(name)
    if problem:
        return checker.reject(name, problem)
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        return checker.reject(name, "symlink")
    if path.is_dir():
        return checker.reject(name, "is_directory")
    if not path.is_file():
        return checker.reject(name, "missing_file")
    _check_uploaded_image(_NamedChecker(checker, name), path, text)


class _NamedChecker:
    """Reports a folder member by its relative name rather than its base name."""

    def __init__(self, checker: _Checker, name: str):
        self._checker = checker
        self._name = name
        self.limits = checker.limits

    def room_left(self, item: str) -> bool:
        return True

    def reject(self, item: str, code: str, detail: str = "") -> None:
        self._checker.reject(self._name, code, detail)

    def add(self, item: str, text: str | None, data: bytes) -> None:
        self._checker.add(self._name, text, data)


def _metadata_rows(checker: _Checker, stream: BinaryIO) -> Iterator[tuple[str, str, str | None]]:
    """``(item, file_name, text)`` per valid ``metadata.jsonl`` line; bad lines are reported."""
    lines = TextLines(stream, checker.limits.max_caption_chars * 8 + 4096)
    for number, line, too_long in lines:
        item = f"{METADATA_NAME} line {number}"
        if too_long:
            checker.reject(item, "oversized")
            continue
        if line is None:
            checker.reject(item, "bad_encoding")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            checker.reject(item, "bad_row", "not JSON")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            checker.reject(item, "bad_row", 'needs {"file_name": ..., "text": ...}')
            continue
        text = row.get("text")
        yield item, row["file_name"], text if isinstance(text, str) else None
    checker.note(METADATA_NAME, lines.encoding or "utf-8")


def _name_problem(name: str) -> str | None:
    """``bad_name`` (empty, ``.``), ``unsafe_path`` (absolute, ``..``, a drive), else None."""
    posix = PurePosixPath(name.replace("\\", "/"))
    if not posix.parts:
        return "bad_name"
    if posix.is_absolute() or ".." in posix.parts or ":" in posix.parts[0]:
        return "unsafe_path"
    return None


def normal_name(name: str) -> str:
    """``./a.png`` and ``a.png`` name the same entry."""
    return PurePosixPath(name.replace("\\", "/")).as_posix()


def _check_zip(checker: _Checker, path: Path) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_READ_ERRORS as exc:
        return checker.reject(path.name, "bad_archive", str(exc)[:80])
    with archive:
        members = _safe_zip_members(checker, archive, path.name)
        if METADATA_NAME in members:
            try:
                with archive.open(members.pop(METADATA_NAME)) as stream:
                    rows = list(_metadata_rows(checker, stream))
            except ZIP_READ_ERRORS as exc:
                return checker.reject(METADATA_NAME, "bad_archive", str(exc)[:80])
            for item, name, text in rows:
                _check_zip_member(checker, archive, members, name, text)
            return
        images = [name for name in sorted(members) if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES]
        if not any(PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES for name in archive.namelist()):
            return checker.reject(path.name, "no_pictures")
        for name in images:
            text = _zip_sidecar_caption(checker, archive, members, name)
            _check_zip_member(checker, archive, members, name, text)


def _safe_zip_members(checker: _Checker, archive: zipfile.ZipFile, zip_name: str) -> dict[str, zipfile.ZipInfo]:
    """The zip's readable, safely named, plausibly sized entries by normalised name; every other one is reported."""
    members: dict[str, zipfile.ZipInfo] = {}
    duplicates: set[str] = set()
    total = 0
    for info in archive.infolist():
        name = normal_name(info.filename)
        if info.is_dir():
            if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
                checker.reject(info.filename, "is_directory", f"in {zip_name}")
            continue
        problem = zip_entry_problem(checker.limits, info, total)
        if problem is None and (name in members or name in duplicates):
            problem = ("duplicate_name", f"in {zip_name}")
            duplicates.add(name)
            members.pop(name, None)
        if problem is not None:
            checker.reject(info.filename, problem[0], problem[1] or f"in {zip_name}")
            continue
        total += info.file_size
        members[name] = info
    return members


def zip_entry_problem(limits: DataLimits, info: zipfile.ZipInfo, total: int) -> tuple[str, str] | None:
    """Why an entry cannot be read safely, from its header alone."""
    name = info.filename
    problem = _name_problem(name)
    if problem:
        return problem, ""
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symlink", ""
    if info.flag_bits & 0x1:
        return "encrypted", ""
    if info.compress_type not in ZIP_METHODS:
        method = zipfile.compressor_names.get(info.compress_type, "unknown")
        return "bad_compression", f"method {info.compress_type} ({method})"
    if PurePosixPath(name).suffix.lower() in ARCHIVE_SUFFIXES:
        return "nested_archive", ""
    if info.file_size > limits.max_file_bytes:
        return "oversized", f"declares {info.file_size} bytes"
    if info.file_size > 1024 and info.file_size > limits.max_zip_ratio * max(info.compress_size, 1):
        return "zip_bomb", f"{info.file_size} bytes from {info.compress_size}"
    if total + info.file_size > limits.max_zip_total_bytes:
        return "oversized", f"archive exceeds {limits.max_zip_total_bytes} bytes"
    return None


def _read_zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes | None:
    """The entry's bytes, or None when it inflates past ``limit`` (its header lied)."""
    with archive.open(info) as stream:
        data = stream.read(limit + 1)
    return None if len(data) > limit else data


def _zip_sidecar_caption(checker: _Checker, archive: zipfile.ZipFile, members: dict, name: str) -> str | None:
    sidecar = str(PurePosixPath(name).with_suffix(".txt"))
    if sidecar not in members:
        return None
    limit = _caption_read_limit(checker.limits)
    try:
        with archive.open(members[sidecar]) as stream:
            data = stream.read(limit + 1)
    except ZIP_READ_ERRORS as exc:
        return checker.reject(sidecar, "bad_archive", str(exc)[:80])
    return _caption_from_bytes(checker, sidecar, data)


def _check_zip_member(checker: _Checker, archive: zipfile.ZipFile, members: dict, name: str, text: str | None) -> None:
    if not checker.room_left(name):
        return
    problem = _name_problem(name)
    if problem:
        return checker.reject(name, problem)
    info = members.get(normal_name(name))
    if info is None:
        if not any(issue.item == name for issue in checker.report.issues):
            checker.reject(name, "missing_file")
        return
    try:
        data = _read_zip_entry(archive, info, checker.limits.max_file_bytes)
    except ZIP_READ_ERRORS as exc:
        return checker.reject(name, "bad_archive", str(exc)[:80])
    if data is None:
        return checker.reject(name, "zip_bomb", "inflates past its declared size")
    checker.add(name, text, data)


def _check_tsv(checker: _Checker, stream: BinaryIO, name: str = "") -> None:
    """EasyNLP rows ``idx<TAB>text<TAB>imgbase64``; field sizes are checked before decoding."""
    line_limit = checker.limits.max_base64_chars + checker.limits.max_caption_chars * 4 + 1024
    lines = TextLines(stream, line_limit)
    for number, line, too_long in lines:
        item = f"row {number}"
        if too_long:
            checker.reject(item, "oversized", f"line longer than {line_limit} bytes")
            continue
        if line is None:
            checker.reject(item, "bad_encoding")
            continue
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 3:
            checker.reject(item, "bad_row", f"expected idx<TAB>text<TAB>imgbase64, got {len(parts)} fields")
            continue
        idx, text, encoded = parts
        item = f"row {number} (idx {idx.strip()})"
        if not checker.room_left(item):
            continue
        if len(encoded) > checker.limits.max_base64_chars:
            checker.reject(item, "oversized", f"image field {len(encoded)} chars")
            continue
        # Both alphabets, padded or not: EasyNLP reads images with urlsafe_b64decode, others write standard base64.
        encoded = encoded.strip().replace("-", "+").replace("_", "/")
        try:
            data = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            checker.reject(item, "bad_base64")
            continue
        checker.add(item, text, data)
    checker.note(name or "TSV", lines.encoding or "utf-8")


def write_pairs_folder(pairs: Iterable[Pair], folder: Path) -> Path:
    """Write checked pairs as ``00000.png``... plus ``metadata.jsonl``: the only data a job reads."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / METADATA_NAME).open("w", encoding="utf-8") as metadata:
        for number, pair in enumerate(pairs):
            name = f"{number:05d}.{pair.format}"
            (folder / name).write_bytes(pair.image_bytes)
            metadata.write(json.dumps({"file_name": name, "text": pair.text, "source": pair.item}, ensure_ascii=False) + "\n")
    return folder
