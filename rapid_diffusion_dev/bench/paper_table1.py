"""The paper's Table 1 layout (FID per domain and their average) for any domain whose test data you supply.

    # the demo world's test distribution: captions with their ground-truth renders, and a second,
    # independent draw of the same distribution (the reference that gives the floor row)
    python -m rapid_diffusion_dev.bench.paper_table1 --write-demo-data bench-data --num 200
    # one column per --domain / --data pair (in order), the average last
    python -m rapid_diffusion_dev.bench.paper_table1 --domain demo --data bench-data/demo-test.tsv \\
        --reference-data bench-data/demo-reference.tsv [--domain food --data food-test.tsv ...] --out bench-out

Each domain is evaluated by ``rapid-diffusion eval --data`` itself (one image per caption, seeds from 0,
the domain's steps, sampler and guidance), so the figures are the ones the command reports; its
report.json lands in ``OUT/<domain>/``. ``--reference-data`` (optional, per domain) adds a floor row: the
distance between the test set and another real set of the same domain, what a perfect generator would
score at this sample size. Standard FID needs pytorch-fid's Inception weights; where they cannot be had,
``--stand-in-features`` measures with the labelled stand-in (seeded random weights), and the table says
in its first cell that these are not FIDs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from rapid_diffusion.demo import world
from rapid_diffusion.evaluation.fid import fid, stand_in_extractor, standard_extractor
from rapid_diffusion.evaluation.weights import WeightsUnavailable
from rapid_diffusion.serving import cli
from rapid_diffusion.training.data import check_path

DEMO_TEST = "demo-test.tsv"
DEMO_REFERENCE = "demo-reference.tsv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-demo-data", type=Path, default=None, metavar="DIR",
                        help=f"write {DEMO_TEST} and {DEMO_REFERENCE} (the demo world's test split) into DIR and stop")
    parser.add_argument("--num", type=int, default=200, help="pairs per demo file")
    parser.add_argument("--domain", action="append", default=[], help="a domain id; repeat, each with its --data")
    parser.add_argument("--data", action="append", type=Path, default=[], help="the test pairs of the --domain before it")
    parser.add_argument("--reference-data", action="append", type=Path, default=[],
                        help="optional, in the order of --domain: another real set of that domain, for the floor row")
    parser.add_argument("--out", type=Path, default=Path("bench-out/paper-table1"))
    parser.add_argument("--stand-in-features", action="store_true", help="the labelled stand-in instead of the standard Inception weights")
    parser.add_argument("--fid-weights", type=Path, default=None, help="a local copy of pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--clip-model", default=None, help="passed to eval (adds R@K)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--super-resolution", action=argparse.BooleanOptionalAction, default=None,
                        help="x4 super-resolution of the generated images (default: each domain's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.write_demo_data is None and (not args.domain or len(args.domain) != len(args.data)):
        parser.error("give each --domain its --data (or --write-demo-data DIR)")
    if len(args.reference_data) > len(args.domain):
        parser.error("more --reference-data than --domain")
    return args


def write_demo_data(folder: Path, num: int) -> list[Path]:
    """``num`` pairs of the world's test split (captions in its varied phrasings, ground-truth renders) as
    EasyNLP TSVs: the test set (seed 0) and an independent reference draw (seed 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in ((DEMO_TEST, 0), (DEMO_REFERENCE, 1)):
        images, captions, _ = world.sample_batch(np.random.default_rng(seed), num, split="test")
        rows = [f"{i}\t{caption}\t{png_base64(image)}" for i, (caption, image) in enumerate(zip(captions, images))]
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths.append(folder / name)
    return paths


def png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def run_eval(args: argparse.Namespace, domain: str, data: Path) -> dict | None:
    """``rapid-diffusion eval --data`` for one domain; its report, or None (the command said why on stderr)."""
    out = args.out / domain
    argv = ["eval", "--domain", domain, "--data", str(data), "--out", str(out), "--seed", str(args.seed)]
    argv += ["--stand-in-features"] if args.stand_in_features else []
    argv += ["--fid-weights", str(args.fid_weights)] if args.fid_weights else []
    argv += ["--clip-model", args.clip_model] if args.clip_model else []
    argv += ["--steps", str(args.steps)] if args.steps else []
    argv += [] if args.super_resolution is None else ["--super-resolution" if args.super_resolution else "--no-super-resolution"]
    if cli.main(argv) != 0:
        return None
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def floor(args: argparse.Namespace, data: Path, reference: Path) -> float | None:
    """The distance between two real sets of one domain, with the features the eval used."""
    try:
        extractor = stand_in_extractor() if args.stand_in_features else standard_extractor(args.fid_weights)
    except WeightsUnavailable:
        return None  # eval has already said why
    return fid(*(extractor(pair.image() for pair in check_path(path).pairs) for path in (data, reference)))


def cell(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def average(values: list[float | None]) -> str:
    """The mean over the domains that have a value, saying how many when some do not."""
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    return cell(float(np.mean(known))) + ("" if len(known) == len(values) else f" ({len(known)} of {len(values)})")


def table(domains: list[str], rows: dict[str, list[float | None]], fid_label: str) -> str:
    """Markdown: a column per domain, then the average of every row."""
    lines = [f"| {fid_label} | " + " | ".join(domains) + " | Average |", "|---" * (len(domains) + 2) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(v) for v in values) + f" | {average(values)} |" for name, values in rows.items()]
    return "\n".join(lines)


def metric(reports: dict[str, dict | None], key: str) -> list[float | None]:
    return [(report or {}).get("metrics", {}).get(key) for report in reports.values()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_demo_data is not None:
        for path in write_demo_data(args.write_demo_data, args.num):
            print(path)
        return 0
    reports = {domain: run_eval(args, domain, data) for domain, data in zip(args.domain, args.data)}
    fid_key = "fid_stand_in" if args.stand_in_features else "fid"
    rows = {"FID ↓ (generated vs test set)": metric(reports, fid_key), "Chinese CLIP score ↑": metric(reports, "clip_score")}
    if args.reference_data:
        floors = [floor(args, data, ref) for data, ref in zip(args.data, args.reference_data)]
        rows["floor ↓ (reference set vs test set)"] = floors + [None] * (len(args.domain) - len(floors))
    label = "stand-in features (NOT FID, not comparable with the paper)" if args.stand_in_features else "pytorch-fid Inception"
    text = table(args.domain, rows, label)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table1.md").write_text(text + "\n", encoding="utf-8")
    (args.out / "table1.json").write_text(json.dumps({"features": label, "domains": args.domain, "rows": rows}, ensure_ascii=False, indent=2), encoding="utf-8")
    return 0 if all(reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
