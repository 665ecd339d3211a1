"""Hazard suite: every hostile or careless file, fed to ``rapid-diffusion check-data`` as a
separate process under a memory cap and a timeout. Each must end in a named rejection (or a
named note) and the documented exit status: 0 when some pair is usable, 1 when none is;
never a traceback. The files are built here, byte by byte where zipfile would refuse.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from helpers import bomb_png, patch_zip_entry, png_bytes

ROOT = Path(__file__).resolve().parents[1]
MEMORY_CAP = 1536 * 2**20  # address space: a bomb that inflates would hit it
TIME_LIMIT_S = 60


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def check_data(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rapid_diffusion", "check-data", str(path)],
        capture_output=True, text=True, env=env, timeout=TIME_LIMIT_S, preexec_fn=limit_memory, cwd=path.parent,
    )


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def zip_with_good_pair(path: Path, extra_rows: list[dict], entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("good.png", png_bytes(1))
        for name, data in entries.items():
            archive.writestr(name, data)
        archive.writestr("metadata.jsonl", jsonl([{"file_name": "good.png", "text": "好的"}, *extra_rows]))
    return path


# Each builder makes one hazard under tmp_path and returns (path, expected output fragments, exit status).


def encrypted_entry(tmp: Path):
    path = zip_with_good_pair(tmp / "encrypted.zip", [{"file_name": "secret.png", "text": "加密"}], {"secret.png": png_bytes(2)})
    patch_zip_entry(path, "secret.png", flag_bits=0x1)
    return path, ["secret.png: 压缩包条目已加密 / encrypted zip entry"], 0


def unsupported_method(tmp: Path):
    path = zip_with_good_pair(tmp / "method.zip", [{"file_name": "odd.png", "text": "方法"}], {"odd.png": png_bytes(2)})
    patch_zip_entry(path, "odd.png", method=99)
    return path, ["odd.png: 不支持的压缩方式 / unsupported compression method (method 99"], 0


def only_encrypted_metadata(tmp: Path):
    path = zip_with_good_pair(tmp / "locked.zip", [], {})
    patch_zip_entry(path, "metadata.jsonl", flag_bits=0x1)
    return path, ["metadata.jsonl: 压缩包条目已加密 / encrypted zip entry", "good.png: 缺少描述文字 / missing caption"], 1


def dot_names(tmp: Path):
    rows = [{"file_name": ".", "text": "点"}, {"file_name": "./", "text": "点斜杠"}, {"file_name": "", "text": "空"}]
    path = zip_with_good_pair(tmp / "dots.zip", rows, {".": b"dot entry"})
    return path, [".: 文件名为空或只有“.” / empty file name or '.'", "./: 文件名为空", ": 文件名为空"], 0


def dot_names_in_folder(tmp: Path):
    folder = tmp / "dots"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(1))
    (folder / "metadata.jsonl").write_text(jsonl([{"file_name": "good.png", "text": "好"}, {"file_name": "./", "text": "点"}]), encoding="utf-8")
    return folder, ["./: 文件名为空或只有“.” / empty file name or '.'"], 0


def zip_slip(tmp: Path):
    rows = [{"file_name": "../evil.png", "text": "越界"}, {"file_name": "/etc/abs.png", "text": "绝对"}]
    path = zip_with_good_pair(tmp / "slip.zip", rows, {"../evil.png": png_bytes(3), "/etc/abs.png": png_bytes(4)})
    return path, ["../evil.png: 路径不安全", "/etc/abs.png: 路径不安全"], 0


def ratio_bomb(tmp: Path):
    path = zip_with_good_pair(tmp / "bomb.zip", [{"file_name": "zeros.png", "text": "炸弹"}], {"zeros.png": b"\0" * (16 * 2**20)}, zipfile.ZIP_DEFLATED)
    return path, ["zeros.png: 压缩比异常（压缩炸弹） / suspicious compression ratio (zip bomb)"], 0


def nested_zip(tmp: Path):
    inner = tmp / "inner.zip"
    zip_with_good_pair(inner, [], {})
    path = zip_with_good_pair(tmp / "outer.zip", [], {"inner.zip": inner.read_bytes()})
    return path, ["inner.zip: 压缩包内的压缩包不会被打开 / nested archive, not opened"], 0


def duplicate_names(tmp: Path):
    path = tmp / "dup.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("good.png", png_bytes(1))
        archive.writestr("twice.png", png_bytes(2))
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("twice.png", png_bytes(3))
        archive.writestr("metadata.jsonl", jsonl([{"file_name": "good.png", "text": "好"}, {"file_name": "twice.png", "text": "两次"}]))
    return path, ["twice.png: 压缩包内文件名重复 / duplicate name in the archive"], 0


def directory_named_like_image(tmp: Path):
    path = tmp / "dirs.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("good.png", png_bytes(1))
        archive.writestr("good.txt", "好的")
        archive.writestr(zipfile.ZipInfo("photo.png/"), b"")
    return path, ["photo.png/: 这是文件夹，不是图片 / a folder, not an image"], 0


def directory_named_like_image_in_folder(tmp: Path):
    folder = tmp / "dirs"
    (folder / "photo.png").mkdir(parents=True)
    (folder / "good.png").write_bytes(png_bytes(1))
    (folder / "good.txt").write_text("好的", encoding="utf-8")
    return folder, ["photo.png: 这是文件夹，不是图片 / a folder, not an image"], 0


def not_a_zip(tmp: Path):
    path = tmp / "fake.zip"
    path.write_bytes(b"PK\x03\x04 this is not really a zip")
    return path, ["fake.zip: 压缩包损坏或无法读取 / corrupt or unreadable zip archive"], 1


def empty_zip_file(tmp: Path):
    path = tmp / "empty.zip"
    path.write_bytes(b"")
    return path, ["empty.zip: 空文件 / empty file"], 1


def empty_tsv(tmp: Path):
    path = tmp / "empty.tsv"
    path.write_bytes(b"")
    return path, ["empty.tsv: 空文件 / empty file"], 1


def empty_metadata_and_image(tmp: Path):
    folder = tmp / "empty-meta"
    folder.mkdir()
    (folder / "metadata.jsonl").write_bytes(b"")
    return folder, ["metadata.jsonl: 空文件 / empty file"], 1


def empty_image_and_caption(tmp: Path):
    folder = tmp / "empties"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(1))
    (folder / "good.txt").write_text("好的", encoding="utf-8")
    (folder / "zero.png").write_bytes(b"")
    (folder / "zero.txt").write_text("零字节的图片", encoding="utf-8")
    (folder / "blank.png").write_bytes(png_bytes(2))
    (folder / "blank.txt").write_bytes(b"")
    return folder, ["zero.png: 空文件 / empty file", "blank.txt: 空文件 / empty file", "blank.png: 缺少描述文字 / missing caption"], 0


def gbk_metadata(tmp: Path):
    folder = tmp / "gbk"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(1))
    (folder / "b.png").write_bytes(png_bytes(2))
    text = jsonl([{"file_name": "a.png", "text": "一碗牛肉拉面"}, {"file_name": "b.png", "text": "清蒸鲈鱼"}])
    (folder / "metadata.jsonl").write_bytes(text.encode("gbk"))
    return folder, ["metadata.jsonl: 按 GB18030 解码 / decoded as GB18030", "2 usable pairs, 0 items skipped"], 0


def bom_metadata(tmp: Path):
    folder = tmp / "bom"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(1))
    (folder / "b.png").write_bytes(png_bytes(2))
    text = jsonl([{"file_name": "a.png", "text": "红烧肉"}, {"file_name": "b.png", "text": "北京烤鸭"}])
    (folder / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return folder, ["2 usable pairs, 0 items skipped"], 0


def utf16_sidecar(tmp: Path):
    folder = tmp / "utf16"
    folder.mkdir()
    (folder / "cat.png").write_bytes(png_bytes(1))
    (folder / "cat.txt").write_text("一只猫", encoding="utf-16")
    return folder, ["cat.txt: 按 UTF-16 解码 / decoded as UTF-16", "1 usable pair,"], 0


def gbk_tsv(tmp: Path):
    import base64

    path = tmp / "gbk.tsv"
    rows = [f"1\t红色的圆\t{base64.b64encode(png_bytes(1)).decode()}", f"2\t蓝色方块\t{base64.b64encode(png_bytes(2)).decode()}"]
    path.write_bytes(("\n".join(rows) + "\n").encode("gbk"))
    return path, ["gbk.tsv: 按 GB18030 解码 / decoded as GB18030", "2 usable pairs"], 0


def undecodable_caption(tmp: Path):
    folder = tmp / "garbage"
    folder.mkdir()
    (folder / "x.png").write_bytes(png_bytes(1))
    (folder / "x.txt").write_bytes(b"\xff\xff\x80\x00garbage\xfe")
    return folder, ["x.txt: 文字编码无法识别（请用 UTF-8） / unknown text encoding (use UTF-8)", "x.png: 缺少描述文字"], 1


def oversized_pixels(tmp: Path):
    folder = tmp / "pixels"
    folder.mkdir()
    (folder / "huge.png").write_bytes(bomb_png(side=100_000))
    (folder / "huge.txt").write_text("十亿像素", encoding="utf-8")
    return folder, ["huge.png: 图片像素过多（解压炸弹） / too many pixels (decompression bomb)"], 1


def every_problem_of_an_item(tmp: Path):
    folder = tmp / "many"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes(1))
    (folder / "tiny.png").write_bytes(png_bytes(2, side=8))
    (folder / "metadata.jsonl").write_text(jsonl([{"file_name": "good.png", "text": "好"}, {"file_name": "tiny.png", "text": " "}]), encoding="utf-8")
    return folder, ["tiny.png: 缺少描述文字 / missing caption", "tiny.png: 图片太小 / image too small", "1 usable pair, 1 item skipped"], 0


HAZARDS = [
    encrypted_entry, unsupported_method, only_encrypted_metadata, dot_names, dot_names_in_folder, zip_slip, ratio_bomb,
    nested_zip, duplicate_names, directory_named_like_image, directory_named_like_image_in_folder, not_a_zip,
    empty_zip_file, empty_tsv, empty_metadata_and_image, empty_image_and_caption, gbk_metadata, bom_metadata,
    utf16_sidecar, gbk_tsv, undecodable_caption, oversized_pixels, every_problem_of_an_item,
]


@pytest.mark.parametrize("build", HAZARDS, ids=[h.__name__ for h in HAZARDS])
def test_check_data_names_the_hazard(tmp_path, build):
    path, expected, status = build(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    start = time.perf_counter()
    result = check_data(path)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    for fragment in expected:
        assert fragment in result.stdout, f"{fragment!r} not in:\n{output}"
    assert result.returncode == status, output
    assert seconds < TIME_LIMIT_S
    assert sorted(tmp_path.rglob("*")) == before  # nothing extracted or written
