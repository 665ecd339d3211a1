"""Image-text pairs for fine-tuning, and the checker that says which items are usable and why.

Three formats are read:

* uploaded images with captions (typed per image, or a ``.txt`` beside each image),
* a folder or a zip with ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line),
* EasyNLP TSV rows ``idx<TAB>text<TAB>imgbase64``.

Everything is checked before it is decoded: file and field sizes, the image header's pixel
count (decompression bombs), zip entry names (absolute, ``..``, symlinks) and compression
ratios (zip bombs). Zip entries are read one by one into memory; nothing is extracted.
Each rejected item is reported by name (file name, or TSV row and idx) with a Chinese and an
English reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import stat
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable, Iterator

from PIL import Image, UnidentifiedImageError

from .settings import settings

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TSV_SUFFIXES = (".tsv",)
METADATA_NAME = "metadata.jsonl"


@dataclass(frozen=True)
class DataLimits:
    """What the checker accepts; a public host can tighten these through the environment."""

    max_pixels: int = 4096 * 4096
    min_side: int = 64
    max_file_bytes: int = 20 * 2**20
    max_caption_chars: int = 200
    max_items: int = 10_000
    max_zip_total_bytes: int = 2 * 2**30
    max_zip_ratio: float = 100.0

    @classmethod
    def from_env(cls) -> "DataLimits":
        current = settings()
        return cls(max_pixels=current.max_pixels, max_file_bytes=current.max_file_bytes, max_items=current.max_items)

    @property
    def max_base64_chars(self) -> int:
        return (self.max_file_bytes + 2) // 3 * 4


# Pillow's own bomb check (warning above the cap, error above twice the cap) agrees with ours.
Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or DataLimits.max_pixels, DataLimits.max_pixels)

REASONS = {
    "missing_file": ("文件不存在", "file not found"),
    "unsafe_path": ("路径不安全（绝对路径或包含 ..）", "unsafe path (absolute or containing ..)"),
    "symlink": ("符号链接，已拒绝", "symbolic link, refused"),
    "undecodable": ("无法解码的图片", "not a decodable image"),
    "truncated": ("图片文件不完整（被截断）", "truncated image file"),
    "bomb": ("图片像素过多（解压炸弹）", "too many pixels (decompression bomb)"),
    "zip_bomb": ("压缩比异常（压缩炸弹）", "suspicious compression ratio (zip bomb)"),
    "too_small": ("图片太小", "image too small"),
    "oversized": ("文件或字段过大", "file or field too large"),
    "missing_caption": ("缺少描述文字", "missing caption"),
    "caption_too_long": ("描述文字过长", "caption too long"),
    "bad_base64": ("base64 编码无效", "invalid base64"),
    "bad_row": ("格式错误的行", "malformed row"),
    "duplicate_image": ("重复的图片", "duplicate image"),
    "duplicate_pair": ("重复的图文对", "duplicate image-text pair"),
    "too_many": ("条目过多，其余已忽略", "too many items, the rest is ignored"),
    "unsupported": ("不支持的文件类型", "unsupported file type"),
}


@dataclass(frozen=True)
class Issue:
    """One rejected item: ``item`` names it (file name, or ``row 3 (idx 17)``)."""

    item: str
    code: str
    detail: str = ""

    @property
    def message(self) -> str:
        zh, en = REASONS[self.code]
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.item}: {zh} / {en}{detail}"


@dataclass(frozen=True)
class Pair:
    """A usable image-text pair; ``image_bytes`` is the original encoded file."""

    item: str
    text: str
    image_bytes: bytes = field(repr=False)
    size: tuple[int, int]
    sha256: str

    def image(self) -> Image.Image:
        with Image.open(io.BytesIO(self.image_bytes)) as img:
            return img.convert("RGB")

    @property
    def format(self) -> str:
        """The file suffix of the encoded image (``png``, ``jpeg``...), read from its header."""
        with Image.open(io.BytesIO(self.image_bytes)) as img:
            return (img.format or "img").lower()


@dataclass
class DataReport:
    pairs: list[Pair] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return bool(self.pairs)

    def summary(self) -> str:
        return (
            f"可用 {len(self.pairs)} 对，跳过 {len(self.issues)} 项 / "
            f"{len(self.pairs)} usable pairs, {len(self.issues)} items skipped"
        )

    def lines(self) -> list[str]:
        return [self.summary()] + [f"  - {issue.message}" for issue in self.issues]


class _Checker:
    """Accumulates pairs and issues, rejecting duplicates as it goes."""

    def __init__(self, limits: DataLimits):
        self.limits = limits
        self.report = DataReport()
        self._first_by_hash: dict[str, str] = {}
        self._pairs_seen: set[tuple[str, str]] = set()
        self._seen = 0

    def reject(self, item: str, code: str, detail: str = "") -> None:
        self.report.issues.append(Issue(item, code, detail))

    def room_left(self, item: str) -> bool:
        self._seen += 1
        if self._seen > self.limits.max_items:
            if self._seen == self.limits.max_items + 1:
                self.reject(item, "too_many", f"max {self.limits.max_items}")
            return False
        return True

    def add(self, item: str, text: str | None, data: bytes) -> None:
        caption = (text or "").strip()
        if not caption:
            return self.reject(item, "missing_caption")
        if len(caption) > self.limits.max_caption_chars:
            return self.reject(item, "caption_too_long", f"{len(caption)} > {self.limits.max_caption_chars} chars")
        size = self._check_image(item, data)
        if size is None:
            return
        digest = hashlib.sha256(data).hexdigest()
        if (digest, caption) in self._pairs_seen:
            return self.reject(item, "duplicate_pair", f"same as {self._first_by_hash[digest]}")
        if digest in self._first_by_hash:
            return self.reject(item, "duplicate_image", f"same as {self._first_by_hash[digest]}")
        self._first_by_hash[digest] = item
        self._pairs_seen.add((digest, caption))
        self.report.pairs.append(Pair(item, caption, data, size, digest))

    def _check_image(self, item: str, data: bytes) -> tuple[int, int] | None:
        limits = self.limits
        if len(data) > limits.max_file_bytes:
            return self.reject(item, "oversized", f"{len(data)} bytes > {limits.max_file_bytes}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
                    if width * height > limits.max_pixels:
                        return self.reject(item, "bomb", f"{width}x{height} > {limits.max_pixels} pixels")
                    img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return self.reject(item, "bomb", str(exc)[:80])
        except UnidentifiedImageError:
            return self.reject(item, "undecodable")
        except (OSError, SyntaxError, ValueError) as exc:
            code = "truncated" if "truncated" in str(exc).lower() else "undecodable"
            return self.reject(item, code, str(exc)[:80])
        if min(width, height) < limits.min_side:
            return self.reject(item, "too_small", f"{width}x{height} < {limits.min_side} px")
        return width, height


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
    elif path.suffix.lower() == ".zip":
        _check_zip(checker, path)
    elif path.suffix.lower() in TSV_SUFFIXES:
        with path.open("rb") as stream:
            _check_tsv(checker, stream)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        _check_uploaded_image(checker, path, _sidecar_caption(path, checker.limits))
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
                text = _read_text_file(sidecars[path.stem], checker.limits)
            _check_uploaded_image(checker, path, text)
        else:
            sub = check_path(path, checker.limits)
            for pair in sub.pairs:
                checker.add(pair.item, pair.text, pair.image_bytes)
            checker.report.issues.extend(sub.issues)
    return checker.report


def _check_uploaded_image(checker: _Checker, path: Path, text: str | None) -> None:
    if not checker.room_left(path.name):
        return
    if path.stat().st_size > checker.limits.max_file_bytes:
        return checker.reject(path.name, "oversized", f"{path.stat().st_size} bytes")
    checker.add(path.name, text, path.read_bytes())


def _sidecar_caption(image: Path, limits: DataLimits) -> str | None:
    sidecar = image.with_suffix(".txt")
    return _read_text_file(sidecar, limits) if sidecar.is_file() and not sidecar.is_symlink() else None


def _read_text_file(path: Path, limits: DataLimits) -> str:
    with path.open("rb") as stream:
        return stream.read(limits.max_caption_chars * 4 + 1).decode("utf-8", errors="replace")


def _check_folder(checker: _Checker, root: Path) -> None:
    root = root.resolve()
    if (root / METADATA_NAME).is_file():
        with (root / METADATA_NAME).open("rb") as stream:
            for item, name, text in _metadata_rows(checker, stream):
                _check_folder_member(checker, root, name, text)
        return
    for path in sorted(root.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            _check_folder_member(checker, root, path.name, _sidecar_caption(path, checker.limits))


def _check_folder_member(checker: _Checker, root: Path, name: str, text: str | None) -> None:
    if not checker.room_left(name):
        return
    if not _safe_relative_name(name):
        return checker.reject(name, "unsafe_path")
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        return checker.reject(name, "symlink")
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
    for number, line, too_long in _bounded_lines(stream, checker.limits.max_caption_chars * 8 + 4096):
        item = f"{METADATA_NAME} line {number}"
        if too_long:
            checker.reject(item, "oversized")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            checker.reject(item, "bad_row", "not JSON")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            checker.reject(item, "bad_row", 'needs {"file_name": ..., "text": ...}')
            continue
        text = row.get("text")
        yield item, row["file_name"], text if isinstance(text, str) else None


def _safe_relative_name(name: str) -> bool:
    posix = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not posix.is_absolute() and ".." not in posix.parts and ":" not in posix.parts[0]


def _check_zip(checker: _Checker, path: Path) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return checker.reject(path.name, "undecodable", f"not a zip file: {exc}")
    with archive:
        members = _safe_zip_members(checker, archive, path.name)
        if METADATA_NAME in members:
            with archive.open(members.pop(METADATA_NAME)) as stream:
                rows = list(_metadata_rows(checker, stream))
            for item, name, text in rows:
                _check_zip_member(checker, archive, members, name, text)
            return
        for name in sorted(members):
            if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
                text = _zip_sidecar_caption(checker, archive, members, name)
                _check_zip_member(checker, archive, members, name, text)


def _safe_zip_members(checker: _Checker, archive: zipfile.ZipFile, zip_name: str) -> dict[str, zipfile.ZipInfo]:
    """The zip's regular, safely named, plausibly sized entries; every other one is reported."""
    limits = checker.limits
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in archive.infolist():
        name = info.filename
        if info.is_dir():
            continue
        if not _safe_relative_name(name):
            checker.reject(name, "unsafe_path", f"in {zip_name}")
        elif stat.S_ISLNK(info.external_attr >> 16):
            checker.reject(name, "symlink", f"in {zip_name}")
        elif info.file_size > limits.max_file_bytes:
            checker.reject(name, "oversized", f"declares {info.file_size} bytes")
        elif info.file_size > 1024 and info.file_size > limits.max_zip_ratio * max(info.compress_size, 1):
            checker.reject(name, "zip_bomb", f"{info.file_size} bytes from {info.compress_size}")
        elif total + info.file_size > limits.max_zip_total_bytes:
            checker.reject(name, "oversized", f"archive exceeds {limits.max_zip_total_bytes} bytes")
        else:
            total += info.file_size
            members[name] = info
    return members


def _read_zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes | None:
    """The entry's bytes, or None when it inflates past ``limit`` (its header lied)."""
    with archive.open(info) as stream:
        data = stream.read(limit + 1)
    return None if len(data) > limit else data


def _zip_sidecar_caption(checker: _Checker, archive: zipfile.ZipFile, members: dict, name: str) -> str | None:
    sidecar = str(PurePosixPath(name).with_suffix(".txt"))
    if sidecar not in members:
        return None
    data = _read_zip_entry(archive, members[sidecar], checker.limits.max_caption_chars * 4 + 1)
    return (data or b"").decode("utf-8", errors="replace")


def _check_zip_member(checker: _Checker, archive: zipfile.ZipFile, members: dict, name: str, text: str | None) -> None:
    if not checker.room_left(name):
        return
    if not _safe_relative_name(name):
        return checker.reject(name, "unsafe_path")
    info = members.get(name)
    if info is None:
        if not any(issue.item == name for issue in checker.report.issues):
            checker.reject(name, "missing_file")
        return
    try:
        data = _read_zip_entry(archive, info, checker.limits.max_file_bytes)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return checker.reject(name, "undecodable", str(exc)[:80])
    if data is None:
        return checker.reject(name, "zip_bomb", "inflates past its declared size")
    checker.add(name, text, data)


def _check_tsv(checker: _Checker, stream: BinaryIO) -> None:
    """EasyNLP rows ``idx<TAB>text<TAB>imgbase64``; field sizes are checked before decoding."""
    line_limit = checker.limits.max_base64_chars + checker.limits.max_caption_chars * 4 + 1024
    for number, line, too_long in _bounded_lines(stream, line_limit):
        item = f"row {number}"
        if too_long:
            checker.reject(item, "oversized", f"line longer than {line_limit} bytes")
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
        try:
            data = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            checker.reject(item, "bad_base64")
            continue
        checker.add(item, text, data)


def _bounded_lines(stream: BinaryIO, limit: int) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, too_long)``; a line over ``limit`` bytes is skipped without being held."""
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(1 << 20)
            yield number, "", True
            continue
        yield number, raw.decode("utf-8", errors="replace"), False


def write_pairs_folder(pairs: Iterable[Pair], folder: Path) -> Path:
    """Write checked pairs as ``00000.png``... plus ``metadata.jsonl``: the only data a job reads."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / METADATA_NAME).open("w", encoding="utf-8") as metadata:
        for number, pair in enumerate(pairs):
            name = f"{number:05d}.{pair.format}"
            (folder / name).write_bytes(pair.image_bytes)
            metadata.write(json.dumps({"file_name": name, "text": pair.text, "source": pair.item}, ensure_ascii=False) + "\n")
    return folder
