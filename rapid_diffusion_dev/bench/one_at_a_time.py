"""``dev bench --one-at-a-time``: each level in its own process, as a server holds one copy of a model.

In :func:`rapid_diffusion_dev.bench.speed.run_bench` every level keeps its copy of the weights in one
process, so memory figures add up and an SD1.5-size model cannot be compared at all on a 24 GB
machine. Here each level (plain diffusers included) runs in a fresh process that loads the model,
optimises it in place (no copy), warms every shape the serving policy allows for ``--max-images``,
times the runs and reports its **peak resident memory over its whole life** (load, conversion,
warm-up, generations: what a server on that level needs). Levels run one after another, so
ratios compare runs that did not share the cores; the plain run's images are the reference for
the pixel difference.

    python -m rapid_diffusion dev bench --model sd15-random --levels none,auto,openvino-int8 \\
        --height 512 --width 512 --steps 2 --runs 1 --threads 2 --max-images 8 --one-at-a-time
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rapid_diffusion.speed.levels import apply_optimization

from .speed import (
    OPENVINO_BF16,
    BenchConfig,
    BenchModel,
    LevelRecord,
    bench_spec,
    load_bench_model,
    max_abs_diff,
    native_side,
    process_memory_mb,
    rss_peak_mb,
    summarize,
    time_round,
)


def run_one_at_a_time(config: BenchConfig, log: Callable[[str], None] = print, threads: int | None = None,
                      timeout_s: float = 3600) -> dict:
    """Every level of ``config`` (plain first) in its own process; the summary :func:`summarize` makes."""
    levels = ["none"] + [level for level in config.levels if level != "none"]
    records, images = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for level in levels:
            log(f"level '{level}' in a fresh process")
            images_file = Path(folder) / f"{level}.npy"
            job = {"config": asdict(config), "level": level, "threads": threads, "images": str(images_file)}
            finished = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(job), stdout=subprocess.PIPE, text=True,
                                      timeout=timeout_s)  # its log goes to our stderr as it comes
            if finished.returncode != 0:
                raise RuntimeError(f"level '{level}': the process ended with status {finished.returncode} "
                                   "(a negative status is a signal: -9 is most often the kernel's out-of-memory killer)")
            report = json.loads(finished.stdout.strip().splitlines()[-1])
            model = BenchModel(None, report.pop("model"), report.pop("model_note"))
            height, width = report.pop("height"), report.pop("width")
            records[level] = LevelRecord(**report)
            images[level] = np.load(images_file)
            log(f"level '{level}': applied '{records[level].applied}', setup {records[level].setup_s:.1f}s, "
                f"peak {records[level].peak_memory_mb / 1024:.1f} GiB")
    for level in levels:
        records[level].max_abs_diff_vs_plain = max_abs_diff(images[level], images["none"])
    result = summarize(config, model, torch.device(config.device), torch.float32, height, width, records)
    result["one_at_a_time"] = True
    return result


def measure_level(config: BenchConfig, level: str, images_file: Path) -> dict:
    """In the child process: load, optimise in place, warm up, time; peak RSS over the process's life."""
    device, dtype = torch.device(config.device), torch.float32
    model = load_bench_model(config.model, lambda message: print(message, file=sys.stderr), device, dtype)
    pipe = model.pipe.to(device, dtype)
    side = native_side(pipe)
    height, width = config.height or side, config.width or side
    record = LevelRecord(requested=level)
    start = time.perf_counter()
    precision = "bf16" if level == OPENVINO_BF16 else None
    record.applied = apply_optimization(
        pipe, "openvino" if precision else level, log=lambda message: print(message, file=sys.stderr),
        height=height, width=width, max_images=config.max_images, precision=precision, sizes=[(height, width)],
    )
    record.setup_s = time.perf_counter() - start
    record.memory_before_mb = process_memory_mb("VmRSS:")
    spec = bench_spec(model, height, width, config)
    time_round(pipe, LevelRecord(level), config, height, width, spec, model.upscaler, device)  # untimed
    for _ in range(config.runs):
        images = time_round(pipe, record, config, height, width, spec, model.upscaler, device)
    np.save(images_file, images)
    record.peak_memory_mb = rss_peak_mb()
    return {**asdict(record), "model": model.name, "model_note": model.note, "height": height, "width": width}


def main() -> None:
    job = json.loads(sys.stdin.read())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    config = BenchConfig(**{**job["config"], "levels": tuple(job["config"]["levels"])})
    print(json.dumps(measure_level(config, job["level"], Path(job["images"]))))


if __name__ == "__main__":
    main()
