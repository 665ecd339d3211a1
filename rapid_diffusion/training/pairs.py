"""What the pair checker works with and reports: its limits, the reasons an item is refused, a usable pair, the report."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image

from ..settings import settings


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
    "empty_file": ("空文件", "empty file"),
    "bad_name": ("文件名为空或只有“.”", "empty file name or '.'"),
    "is_directory": ("这是文件夹，不是图片", "a folder, not an image"),
    "duplicate_name": ("压缩包内文件名重复", "duplicate name in the archive"),
    "encrypted": ("压缩包条目已加密", "encrypted zip entry"),
    "bad_archive": ("压缩包损坏或无法读取", "corrupt or unreadable zip archive"),
    "no_pictures": ("压缩包里没有图片", "the zip holds no pictures"),
    "bad_compression": ("不支持的压缩方式", "unsupported compression method"),
    "nested_archive": ("压缩包内的压缩包不会被打开", "nested archive, not opened"),
    "bad_encoding": ("文字编码无法识别（请用 UTF-8）", "unknown text encoding (use UTF-8)"),
    "decoded_gb18030": ("按 GB18030 解码", "decoded as GB18030"),
    "decoded_utf16": ("按 UTF-16 解码", "decoded as UTF-16"),
}
# Codes that describe how a file was read, not why it was skipped.
NOTE_CODES = {"gb18030": "decoded_gb18030", "utf-16": "decoded_utf16"}


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
    """Usable pairs, every problem (an item may have several), and notes on how files were read."""

    pairs: list[Pair] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    notes: list[Issue] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return bool(self.pairs)

    @property
    def skipped(self) -> int:
        return len({issue.item for issue in self.issues})

    def summary(self) -> str:
        pairs, skipped = len(self.pairs), self.skipped
        return (
            f"可用 {pairs} 对，跳过 {skipped} 项 / "
            f"{pairs} usable {'pair' if pairs == 1 else 'pairs'}, {skipped} {'item' if skipped == 1 else 'items'} skipped"
        )

    def lines(self) -> list[str]:
        notes = [f"  * {note.message}" for note in self.notes]
        return [self.summary()] + notes + [f"  - {issue.message}" for issue in self.issues]
