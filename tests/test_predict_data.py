"""EasyNLP data as PAI's tools write it: images in TSV rows in either base64 alphabet, padded or not.

EasyNLP's latent-diffusion dataset decodes images with ``urlsafe_b64decode`` (``-`` and ``_``);
other tools write the standard alphabet (``+`` and ``/``). ``check-data``, ``train`` and
``eval --data`` read TSV rows through the same check, so the subprocess below stands for all three.
"""

import base64
import os
import subprocess
import sys

import pytest

from rapid_diffusion.training.data import check_path

from helpers import REPO_ROOT, png_bytes


def encodings(image: bytes) -> dict[str, str]:
    standard, urlsafe = base64.b64encode(image).decode(), base64.urlsafe_b64encode(image).decode()
    return {"standard": standard, "standard-unpadded": standard.rstrip("="), "urlsafe": urlsafe, "urlsafe-unpadded": urlsafe.rstrip("=")}


@pytest.fixture()
def tsv(tmp_path):
    """12 URL-safe rows (padded and not), 2 standard rows, 2 rows that are no base64 at all."""
    images = {number: png_bytes(number, side=64 + number % 3) for number in range(1, 15)}
    rows = []
    for number, image in images.items():
        form = ("standard", "standard-unpadded")[number % 2] if number > 12 else ("urlsafe", "urlsafe-unpadded")[number % 2]
        rows.append(f"{number}\t第 {number} 张图\t{encodings(image)[form]}")
    rows += ["15\t坏的编码\t***not base64***", f"16\t两种字母混在中间\t{encodings(images[1])['urlsafe'][:8]}=={encodings(images[1])['urlsafe'][8:]}"]
    url_safe = "".join(row.split("\t")[2] for row in rows[:12])
    assert "-" in url_safe and "_" in url_safe and any(not row.endswith("=") for row in rows[:12]), "the rows test what they claim"
    assert any(row.endswith("=") for row in rows[:12]) and all(c not in url_safe for c in "+/")
    path = tmp_path / "easynlp.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path, images


def test_both_alphabets_padded_or_not_decode_to_the_original_images(tsv):
    path, images = tsv
    report = check_path(path)
    assert [pair.image_bytes for pair in report.pairs] == list(images.values()), "byte for byte what was encoded"
    assert {issue.item: issue.code for issue in report.issues} == {"row 15 (idx 15)": "bad_base64", "row 16 (idx 16)": "bad_base64"}


def test_check_data_accepts_url_safe_rows_from_the_command_line(tsv):
    path, images = tsv
    result = subprocess.run(
        [sys.executable, "-m", "rapid_diffusion", "check-data", str(path)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(images)} usable pairs, 2 items skipped" in result.stdout
    assert "row 15 (idx 15)" in result.stdout and "row 3 (idx 3)" not in result.stdout
