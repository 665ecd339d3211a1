"""The Table 1 benchmark's own parts: the demo test data it writes, and the table it prints."""

from __future__ import annotations

import os
import subprocess
import sys

from rapid_diffusion.demo import judge, world
from rapid_diffusion.training.data import check_path
from rapid_diffusion_dev.bench.paper_table1 import DEMO_REFERENCE, DEMO_TEST, table


def test_demo_data_is_two_independent_draws_of_the_test_split(tmp_path):
    """Written by the script itself (a subprocess): EasyNLP TSVs the eval's reader accepts whole, 64x64 renders
    each holding a test-split combination (as the demo judge reads them), no picture shared by the two files."""
    out = subprocess.run([sys.executable, "-m", "rapid_diffusion_dev.bench.paper_table1", "--write-demo-data", str(tmp_path), "--num", "6"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    test, reference = (check_path(tmp_path / name) for name in (DEMO_TEST, DEMO_REFERENCE))
    assert (len(test.pairs), len(reference.pairs), test.issues, reference.issues) == (6, 6, [], [])
    assert not {p.sha256 for p in test.pairs} & {p.sha256 for p in reference.pairs}
    for pair in test.pairs + reference.pairs:
        assert pair.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
        assert any(world.split_of(obj.colour, obj.shape, obj.position) == "test" for obj in judge.judge_image(pair.image()))


def test_table_averages_the_domains_that_have_a_value():
    text = table(["demo", "food"], {"FID ↓": [12.0, None], "floor ↓": [3.0, 5.0]}, "stand-in features")
    assert text.splitlines() == [
        "| stand-in features | demo | food | Average |",
        "|---|---|---|---|",
        "| FID ↓ | 12.00 | n/a | 12.00 (1 of 2) |",
        "| floor ↓ | 3.00 | 5.00 | 4.00 |",
    ]
