"""Super-resolution speed at the paper's setting: the 23-block RRDBNet (RealESRGAN_x4plus's shape).

Without ``--weights`` the network has random weights: its time does not depend on their values,
and nothing needs downloading. On CUDA it runs in fp16 (what the registry uses), fp32 beside it.

    python benchmarks/sr_speed.py --device cuda --size 256 --json sr.json     # 256 -> 1024
    python benchmarks/sr_speed.py --device cpu --size 64                       # 64 -> 256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapid_diffusion.bench import bench_upscaler  # noqa: E402
from rapid_diffusion.sr_bench import time_upscaler  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="an ESRGAN checkpoint (default: random 23-block RRDBNet)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (output is 4x)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tile", type=int, default=256, help="tile side in input pixels (0: whole image)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtypes = [torch.float16, torch.float32] if device.type == "cuda" else [torch.float32]
    results = []
    for dtype in dtypes:
        upscaler = bench_upscaler(str(args.weights or "rrdb23"), device, dtype, tile=args.tile or None)
        with torch.inference_mode():
            record = time_upscaler(upscaler, size=args.size, runs=args.runs)
        record["dtype"] = str(dtype).removeprefix("torch.")
        record["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        results.append(record)
        print(f"{record['model']} {record['dtype']} on {record['device']}: {record['input']} -> {record['output']} "
              f"mean {record['mean_s']:.3f} s, min {record['min_s']:.3f} s ({args.runs} runs)")
    if len(results) == 2:
        print(f"fp16 vs fp32: {results[1]['mean_s'] / results[0]['mean_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
