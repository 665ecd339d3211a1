"""The data checker: every format, and every hazard named by item, built in the test itself."""

from __future__ import annotations

import base64
import json
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from rapid_diffusion.serving.cli import main as cli_main
from helpers import bomb_png, png_bytes
from rapid_diffusion.training.data import DataLimits, check_path, check_uploads, decode_text, write_pairs_folder


def truncated_png(seed: int = 99) -> bytes:
    data = png_bytes(seed)
    return data[: len(data) // 2]


def reasons(report) -> dict[str, str]:
    return {issue.item: issue.code for issue in report.issues}


def write_metadata(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture()
def metadata_folder(tmp_path) -> Path:
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(1))
    (folder / "b.png").write_bytes(png_bytes(2))
    (folder / "a_copy.png").write_bytes(png_bytes(1))
    (folder / "broken.png").write_bytes(truncated_png())
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "tiny.png").write_bytes(png_bytes(3, side=16))
    (folder / "text.png").write_bytes(b"this is not an image")
    (folder / "nocap.png").write_bytes(png_bytes(4))
    (folder / "long.png").write_bytes(png_bytes(5))
    rows = [
        {"file_name": "a.png", "text": "一只红色的猫"},
        {"file_name": "b.png", "text": "蓝色的方块"},
        {"file_name": "a.png", "text": "一只红色的猫"},
        {"file_name": "a_copy.png", "text": "另一段描述"},
        {"file_name": "missing.png", "text": "不存在"},
        {"file_name": "broken.png", "text": "截断"},
        {"file_name": "bomb.png", "text": "炸弹"},
        {"file_name": "tiny.png", "text": "太小"},
        {"file_name": "text.png", "text": "不是图片"},
        {"file_name": "nocap.png", "text": "  "},
        {"file_name": "long.png", "text": "长" * 500},
        {"file_name": "../outside.png", "text": "越界"},
    ]
    write_metadata(folder, rows)
    with (folder / "metadata.jsonl").open("a", encoding="utf-8") as f:
        f.write("{not json\n")
    return folder


def test_metadata_folder_reports_every_hazard_by_name(metadata_folder):
    report = check_path(metadata_folder)
    assert [(p.item, p.text) for p in report.pairs] == [("a.png", "一只红色的猫"), ("b.png", "蓝色的方块")]
    assert reasons(report) == {
        "a.png": "duplicate_pair",
        "a_copy.png": "duplicate_image",
        "missing.png": "missing_file",
        "broken.png": "truncated",
        "bomb.png": "bomb",
        "tiny.png": "too_small",
        "text.png": "undecodable",
        "nocap.png": "missing_caption",
        "long.png": "caption_too_long",
        "../outside.png": "unsafe_path",
        "metadata.jsonl line 13": "bad_row",
    }
    assert all(issue.message.count(" / ") >= 1 for issue in report.issues)
    assert report.pairs[0].image().size == (64, 64)


def test_bomb_is_refused_from_the_header_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(side=5000))
    path.with_suffix(".txt").write_text("炸弹", encoding="utf-8")
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or None)
    report = check_path(path, DataLimits(max_pixels=1000 * 1000))
    assert reasons(report) == {"bomb.png": "bomb"}
    assert decoded == []
    assert Image.MAX_IMAGE_PIXELS <= DataLimits().max_pixels


def test_sidecar_captions_in_a_folder(tmp_path):
    (tmp_path / "cat.png").write_bytes(png_bytes(1))
    (tmp_path / "cat.txt").write_text("一只猫\n", encoding="utf-8")
    (tmp_path / "dog.png").write_bytes(png_bytes(2))
    report = check_path(tmp_path)
    assert [(p.item, p.text) for p in report.pairs] == [("cat.png", "一只猫")]
    assert reasons(report) == {"dog.png": "missing_caption"}


def test_folder_links_pointing_outside_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png_bytes(7))
    folder = tmp_path / "pairs"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes(1))
    (folder / "link.png").symlink_to(outside / "secret.png")
    (folder / "dir").symlink_to(outside, target_is_directory=True)
    write_metadata(folder, [
        {"file_name": "ok.png", "text": "好"}, {"file_name": "link.png", "text": "链接"}, {"file_name": "dir/secret.png", "text": "目录链接"},
    ])
    report = check_path(folder)
    assert [p.item for p in report.pairs] == ["ok.png"]
    assert reasons(report) == {"link.png": "symlink", "dir/secret.png": "symlink"}


def test_uploads_with_typed_captions_and_sidecars(tmp_path):
    for name, seed in (("x.png", 1), ("y.png", 2), ("z.png", 3)):
        (tmp_path / name).write_bytes(png_bytes(seed))
    (tmp_path / "y.txt").write_text("旁边的描述", encoding="utf-8")
    files = [tmp_path / n for n in ("x.png", "y.png", "y.txt", "z.png")]
    report = check_uploads(files, captions={"x.png": "输入的描述"})
    assert [(p.item, p.text) for p in report.pairs] == [("x.png", "输入的描述"), ("y.png", "旁边的描述")]
    assert reasons(report) == {"z.png": "missing_caption"}


def make_hostile_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("good.png", png_bytes(1))
        archive.writestr("also.png", png_bytes(2))
        archive.writestr("../evil.png", png_bytes(3))
        archive.writestr(zipfile.ZipInfo("/etc/abs.png"), png_bytes(4))
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        archive.writestr("bomb.png", b"\0" * (2 * 2**20))
        rows = [
            {"file_name": "good.png", "text": "好的"},
            {"file_name": "also.png", "text": "也好"},
            {"file_name": "../evil.png", "text": "越界"},
            {"file_name": "/etc/abs.png", "text": "绝对路径"},
            {"file_name": "link.png", "text": "链接"},
            {"file_name": "bomb.png", "text": "压缩炸弹"},
            {"file_name": "gone.png", "text": "缺失"},
        ]
        archive.writestr("metadata.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_zip_refuses_traversal_absolute_symlink_and_bomb_without_extracting(tmp_path):
    archive = tmp_path / "pairs.zip"
    make_hostile_zip(archive)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    report = check_path(archive)
    assert [(p.item, p.text) for p in report.pairs] == [("good.png", "好的"), ("also.png", "也好")]
    assert reasons(report) == {
        "../evil.png": "unsafe_path",
        "/etc/abs.png": "unsafe_path",
        "link.png": "symlink",
        "bomb.png": "zip_bomb",
        "gone.png": "missing_file",
    }
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not (tmp_path.parent / "evil.png").exists()


def test_zip_with_sidecar_captions(tmp_path):
    archive = tmp_path / "pairs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("img/cat.png", png_bytes(1))
        zf.writestr("img/cat.txt", "一只猫")
        zf.writestr("img/dog.png", png_bytes(2))
    report = check_path(archive)
    assert [(p.item, p.text) for p in report.pairs] == [("img/cat.png", "一只猫")]
    assert reasons(report) == {"img/dog.png": "missing_caption"}


def test_easynlp_tsv_rows(tmp_path):
    good = base64.b64encode(png_bytes(1)).decode()
    other = base64.b64encode(png_bytes(2)).decode()
    limits = DataLimits(max_file_bytes=20_000)
    oversized = "A" * (limits.max_base64_chars + 4)
    rows = [
        f"1\t红色的圆\t{good}",
        f"2\t蓝色的方块\t{other}",
        "3\t坏的编码\t***not base64***",
        f"4\t太大的字段\t{oversized}",
        "5\t只有两列",
        f"6\t红色的圆\t{good}",
        f"7\t\t{other}",
        f"8\t截断\t{base64.b64encode(truncated_png()).decode()}",
    ]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = check_path(path, limits)
    assert [(p.item, p.text) for p in report.pairs] == [("row 1 (idx 1)", "红色的圆"), ("row 2 (idx 2)", "蓝色的方块")]
    codes = reasons(report)
    assert codes == {
        "row 3 (idx 3)": "bad_base64",
        "row 4 (idx 4)": "oversized",
        "row 5": "bad_row",
        "row 6 (idx 6)": "duplicate_pair",
        "row 7 (idx 7)": "missing_caption",
        "row 8 (idx 8)": "truncated",
    }


def test_oversized_tsv_line_is_skipped_without_holding_it(tmp_path):
    path = tmp_path / "huge.tsv"
    good = base64.b64encode(png_bytes(1)).decode()
    path.write_text(f"1\tx\t{'B' * 200_000}\n2\t好\t{good}\n", encoding="utf-8")
    report = check_path(path, DataLimits(max_file_bytes=30_000))
    assert [p.item for p in report.pairs] == ["row 2 (idx 2)"]
    assert reasons(report) == {"row 1": "oversized"}


def test_checked_pairs_written_for_a_job_read_back_the_same(metadata_folder, tmp_path):
    pairs = check_path(metadata_folder).pairs
    folder = write_pairs_folder(pairs, tmp_path / "job" / "data")
    again = check_path(folder)
    assert [(p.item, p.text, p.sha256) for p in again.pairs] == [
        ("00000.png", "一只红色的猫", pairs[0].sha256), ("00001.png", "蓝色的方块", pairs[1].sha256)
    ]
    assert again.issues == []


def test_cli_check_data_names_rejected_items(metadata_folder, capsys):
    assert cli_main(["check-data", str(metadata_folder)]) == 0
    out = capsys.readouterr().out
    assert "2 usable pairs, 11 items skipped" in out
    assert "bomb.png: 图片像素过多（解压炸弹） / too many pixels (decompression bomb)" in out
    assert "missing.png: 文件不存在 / file not found" in out


def test_cli_check_data_fails_when_nothing_is_usable(tmp_path, capsys):
    (tmp_path / "only.png").write_bytes(truncated_png())
    (tmp_path / "only.txt").write_text("描述", encoding="utf-8")
    assert cli_main(["check-data", str(tmp_path)]) == 1
    assert "only.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "data, expected",
    [
        ("一碗牛肉拉面".encode("utf-8"), ("一碗牛肉拉面", "utf-8")),
        (b"\xef\xbb\xbf" + "红烧肉".encode("utf-8"), ("红烧肉", "utf-8")),
        ("清蒸鲈鱼".encode("gbk"), ("清蒸鲈鱼", "gb18030")),
        ("北京烤鸭 𠀀".encode("gb18030"), ("北京烤鸭 𠀀", "gb18030")),
        ("一只猫".encode("utf-16"), ("一只猫", "utf-16")),
        ("一只猫".encode("utf-16-be").join([b"\xfe\xff", b""]), ("一只猫", "utf-16")),
        (b"\xff\xff\x80\x00garbage", None),
        (b"\x81\x30\x81\x30\x00\x01", None),  # decodes as GB18030, but to control characters
    ],
)
def test_caption_encodings_are_detected_or_refused(data, expected):
    assert decode_text(data) == expected


def test_bom_keeps_the_first_metadata_row_and_leaves_no_bom_in_captions(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "b.png").write_bytes(png_bytes(2))
    rows = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"file_name": "a.png", "text": "红烧肉"}, {"file_name": "b.png", "text": "烤鸭"}])
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + rows.encode("utf-8"))
    report = check_path(tmp_path)
    assert [(p.item, p.text) for p in report.pairs] == [("a.png", "红烧肉"), ("b.png", "烤鸭")]
    assert report.issues == [] and report.notes == []


def test_gbk_and_utf16_captions_are_decoded_and_noted_per_file(tmp_path):
    archive = tmp_path / "pairs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cat.png", png_bytes(1))
        zf.writestr("cat.txt", "一只猫".encode("utf-16"))
        zf.writestr("dog.png", png_bytes(2))
        zf.writestr("dog.txt", "一只狗".encode("gbk"))
        zf.writestr("fox.png", png_bytes(3))
        zf.writestr("fox.txt", "一只狐狸".encode("utf-8"))
    report = check_path(archive)
    assert [(p.item, p.text) for p in report.pairs] == [("cat.png", "一只猫"), ("dog.png", "一只狗"), ("fox.png", "一只狐狸")]
    assert [(n.item, n.code) for n in report.notes] == [("cat.txt", "decoded_utf16"), ("dog.txt", "decoded_gb18030")]
    assert "  * cat.txt: 按 UTF-16 解码 / decoded as UTF-16" in report.lines()
    assert report.issues == []


def test_a_line_in_another_encoding_than_the_file_is_rejected_by_line(tmp_path):
    good, other = base64.b64encode(png_bytes(1)).decode(), base64.b64encode(png_bytes(2)).decode()
    path = tmp_path / "mixed.tsv"
    path.write_bytes(f"1\t红色的圆\t{good}\n".encode("utf-8") + f"2\t蓝色方块\t{other}\n".encode("gbk"))
    report = check_path(path)
    assert [p.text for p in report.pairs] == ["红色的圆"]
    assert reasons(report) == {"row 2": "bad_encoding"}


def test_utf16_metadata_jsonl_in_a_zip(tmp_path):
    archive = tmp_path / "pairs.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", png_bytes(1))
        zf.writestr("metadata.jsonl", (json.dumps({"file_name": "./a.png", "text": "宫保鸡丁"}, ensure_ascii=False) + "\r\n").encode("utf-16"))
    report = check_path(archive)
    assert [(p.item, p.text) for p in report.pairs] == [("./a.png", "宫保鸡丁")]
    assert [(n.item, n.code) for n in report.notes] == [("metadata.jsonl", "decoded_utf16")]


def test_every_problem_of_an_item_is_listed_and_counted_once(tmp_path):
    (tmp_path / "tiny.png").write_bytes(png_bytes(3, side=16))
    (tmp_path / "tiny.txt").write_text("长" * 500, encoding="utf-8")
    (tmp_path / "zero.png").write_bytes(b"")
    report = check_path(tmp_path)
    assert [(i.item, i.code) for i in report.issues] == [
        ("tiny.png", "caption_too_long"), ("tiny.png", "too_small"), ("zero.png", "missing_caption"), ("zero.png", "empty_file"),
    ]
    assert report.skipped == 2
    assert "0 usable pairs, 2 items skipped" in report.summary()


def test_hostile_zip_entries_are_named_not_raised(tmp_path):
    from helpers import patch_zip_entry

    archive = tmp_path / "odd.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("locked.png", "method.png", "ok.png"):
            zf.writestr(name, png_bytes(len(name)))
        zf.writestr("metadata.jsonl", "".join(json.dumps({"file_name": n, "text": "图"}) + "\n" for n in ("locked.png", "method.png", "ok.png", ".")))
    patch_zip_entry(archive, "locked.png", flag_bits=0x1)
    patch_zip_entry(archive, "method.png", method=99)
    with zipfile.ZipFile(archive) as zf:  # what the checker must not let escape
        with pytest.raises(RuntimeError):
            zf.read("locked.png")
        with pytest.raises(NotImplementedError):
            zf.read("method.png")
    report = check_path(archive)
    assert [p.item for p in report.pairs] == ["ok.png"]
    assert reasons(report) == {"locked.png": "encrypted", "method.png": "bad_compression", ".": "bad_name"}
