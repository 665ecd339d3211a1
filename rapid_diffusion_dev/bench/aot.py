"""``dev bench --aot``: the ZeroGPU ahead-of-time path (speed/ahead_of_time.py) against plain
diffusers, on a GPU: what issue 30 asks of it.

* **Warm-up** of every shape the UI offers: one ahead-of-time compilation (capture, export with
  dynamic batch and size, AOTInductor), timed, then the first call of each shape.
* **First vs steady latency** per (size, images): a first call far above the steady one means a
  user waited for compilation or loading (target: no first call over 3x its shape's steady one).
* **Speed-up** at 512x512, one image: plain's steady latency over the ahead-of-time one (target >= 3x)
  and the largest pixel difference between the two.
* **Warnings**: how many Python warnings and log records at WARNING or above the compilation and the
  first calls emitted (target: not a flood).

It runs in one process, the compile task called in-process (``on_gpu`` is the task itself) where
ZeroGPU would run it in a ``spaces.GPU`` worker; the binary is the same ``spaces.aoti_compile`` one.
Not measured: a fresh ZeroGPU worker loading the binary on its first call (``spaces`` loads it once per
process). Defaults keep it within a few minutes of an H100: ``--steps 20 --runs 2``, images 1 and 4.
"""

from __future__ import annotations

import copy
import datetime
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable

import torch

from rapid_diffusion.speed.ahead_of_time import compile_ahead_of_time

from .speed import BenchConfig, load_bench_model, machine_info, max_abs_diff, plain_call, shape_row, synchronized

UI_SIZES = ((512, 512), (768, 512), (512, 768), (768, 768), (256, 256))  # (height, width): serving/ui.py COMMON_SIZES
IMAGE_COUNTS = (1, 4)


class CountingHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record) -> None:
        self.count += 1


@contextmanager
def counting_warnings():
    """Counts Python warnings and log records at WARNING or above while the block runs."""
    handler = CountingHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    counts = {"warnings": 0, "log_records": 0}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield counts
    finally:
        root.removeHandler(handler)
        counts.update(warnings=len(caught), log_records=handler.count)


def run_aot(config: BenchConfig, log: Callable[[str], None] = print, sizes=UI_SIZES, counts=IMAGE_COUNTS) -> dict:
    device = torch.device(config.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError("dev bench --aot measures the ZeroGPU path: it needs --device cuda and a CUDA device")
    dtype = torch.float16
    model = load_bench_model(config.model, log, device, dtype)
    plain = copy.deepcopy(model.pipe).to(device, dtype)
    compiled = copy.deepcopy(model.pipe).to(device, dtype)
    shapes = [(height, width, count) for height, width in sizes for count in counts]

    with counting_warnings() as noise:
        start = time.perf_counter()
        acceleration = compile_ahead_of_time(compiled, "auto", lambda task: task(), log, height=sizes[0][0], width=sizes[0][1])
        compile_s = synchronized(start, device)
        log(f"ahead-of-time: {acceleration.state} in {compile_s:.1f}s ({acceleration.reason})")
        aot_rows = [shape_row(compiled, config, height, width, count, device) for height, width, count in shapes]
    plain_rows = [shape_row(plain, config, height, width, count, device) for height, width, count in shapes]

    height, width = sizes[0]
    difference = max_abs_diff(plain_call(compiled, config, height, width), plain_call(plain, config, height, width))
    first_shapes_s = sum(row["first_s"] for row in aot_rows[:: len(counts)])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "config": asdict(config),
        "model": model.name,
        "acceleration": acceleration.as_dict(),
        "compile_s": compile_s,
        "warm_up_every_shape_s": compile_s + first_shapes_s,
        "speedup_512": plain_rows[0]["steady_s"]["median"] / aot_rows[0]["steady_s"]["median"],
        "max_abs_diff_512": difference,
        "worst_first_over_steady": max(row["first_over_steady"] for row in aot_rows),
        "warnings": noise,
        "rows": {"plain": plain_rows, "aot": aot_rows},
    }


def aot_table(result: dict) -> str:
    lines = [
        f"ahead-of-time compile {result['compile_s']:.1f} s; warm-up of every UI size {result['warm_up_every_shape_s']:.1f} s; "
        f"plain / aot at 512x512 {result['speedup_512']:.2f}x (max pixel difference {result['max_abs_diff_512']:.4f}); "
        f"worst first / steady {result['worst_first_over_steady']:.2f}; "
        f"{result['warnings']['warnings']} warnings, {result['warnings']['log_records']} log records >= WARNING",
        "",
        "| path | size | images | first call s | steady s (median) | first / steady |",
        "|---|---|---|---|---|---|",
    ]
    for path, rows in result["rows"].items():
        for row in rows:
            lines.append(f"| {path} | {row['width']}x{row['height']} | {row['images']} | {row['first_s']:.3f} | {row['steady_s']['median']:.3f} "
                         f"| {row['first_over_steady']:.2f} |")
    return "\n".join(lines)
