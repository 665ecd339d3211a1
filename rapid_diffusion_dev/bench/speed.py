"""Benchmark: plain diffusers against each optimisation level, same weights, same seeds.

Every level gets its own copy of one set of weights. Runs are interleaved (one run of every
level per round) so that load from other processes on a shared machine hits all levels alike.
Each round times the plain call ``pipe(prompt, ...)`` end to end, as a user of diffusers would
call it, and the project's staged path (:func:`rapid_diffusion.generation.pipeline.generate`) for the
per-stage figures. ``speedup`` is the plain median end-to-end latency over the best level's.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rapid_diffusion.speed.levels import LEVELS, apply_optimization

DEMO_DOMAIN = "demo"
OPENVINO_BF16 = "openvino-bf16"
BENCH_LEVELS = (*LEVELS, OPENVINO_BF16)
HOOKABLE_LEVELS = ("none", "flash")  # compiled or converted modules hide their submodules from hooks


@dataclass
class BenchConfig:
    model: str = "tiny-random"
    device: str = "cpu"
    steps: int = 20
    height: int | None = None
    width: int | None = None
    runs: int = 3
    levels: tuple[str, ...] = ("none", "flash", "compile")
    prompt: str = "左边有一个大的红色圆形"
    guidance_scale: float = 7.5
    seed: int = 0
    padding_bench: bool = True
    sr: str | None = None
    max_images: int = 1  # images per request the warm-up covers (the server's default is RAPID_DIFFUSION_MAX_IMAGES)
    one_at_a_time: bool = False  # each level in its own process (bench/one_at_a_time.py)


@dataclass
class BenchModel:
    pipe: object
    name: str
    note: str = ""
    spec: object = None
    upscaler: Callable | None = None


@dataclass
class LevelRecord:
    requested: str
    applied: str = ""
    setup_s: float = 0.0
    end_to_end: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=dict)
    unet_evaluations: int = 0
    peak_memory_mb: float = 0.0
    memory_before_mb: float = 0.0
    profile: dict | None = None
    max_abs_diff_vs_plain: float = 0.0


def run_bench(config: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark described by ``config`` and return its JSON-ready result."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_bench_model(config.model, log, device, dtype)
    if config.sr:
        model.upscaler = bench_upscaler(config.sr, device, dtype)
    side = native_side(model.pipe)
    height, width = config.height or side, config.width or side
    levels = ["none"] + [level for level in config.levels if level != "none"]
    spec = bench_spec(model, height, width, config)

    pipes, records = {}, {}
    for level in levels:
        pipes[level], records[level] = prepare_level(model, level, device, dtype, height, width, log, config.max_images)
        peak, before = measure_peak_memory(pipes[level], config, height, width, device)
        records[level].peak_memory_mb, records[level].memory_before_mb = peak, before
        records[level].profile = unet_profile(pipes[level], config, height, width, device) if level in HOOKABLE_LEVELS else None

    for level in levels:  # an untimed round: first-call costs (allocator, oneDNN, guards) stay out
        time_round(pipes[level], LevelRecord(level), config, height, width, spec, model.upscaler, device)
    reference = None
    for round_index in range(config.runs):
        log(f"round {round_index + 1}/{config.runs}")
        for level in levels:
            images = time_round(pipes[level], records[level], config, height, width, spec, model.upscaler, device)
            if reference is None:
                reference = images
            records[level].max_abs_diff_vs_plain = max(records[level].max_abs_diff_vs_plain, max_abs_diff(images, reference))
    result = summarize(config, model, device, dtype, height, width, records)
    if config.padding_bench:
        result["attention_padding"] = head_dim_padding_bench(device, dtype)
    return result


def max_abs_diff(images: np.ndarray, reference: np.ndarray) -> float:
    """The largest pixel difference; infinite when an image has NaN (``max`` would skip a NaN)."""
    difference = float(np.abs(images - reference).max())
    return difference if np.isfinite(difference) else float("inf")


def load_bench_model(name: str, log: Callable[[str], None], device=torch.device("cpu"), dtype=torch.float32) -> BenchModel:
    """``demo`` (the trained demo domain), ``sd15-random``, ``tiny-random`` or a pipeline folder."""
    from rapid_diffusion.models.factory import assemble_pipeline, build_tokenizer, sd15_components, tiny_components

    if name in ("tiny-random", "sd15-random"):
        components = tiny_components(seed=0) if name == "tiny-random" else sd15_components(seed=0)
        with tempfile.TemporaryDirectory() as folder:
            pipe = assemble_pipeline(components, build_tokenizer(Path(folder)))
        pipe.set_progress_bar_config(disable=True)
        return BenchModel(pipe, name)
    if name == "demo":
        return load_demo_model(log, device, dtype)
    return load_folder_model(Path(name), name)


def load_demo_model(log: Callable[[str], None], device, dtype) -> BenchModel:
    from rapid_diffusion.domains import load_domains

    spec = load_domains().get(DEMO_DOMAIN)
    if spec is None or not spec.model.is_local or not (spec.model.path / "model_index.json").is_file():
        note = "demo model not found (rapid_diffusion/data/assets/demo-model); benchmarked tiny-random instead"
        log(note)
        model = load_bench_model("tiny-random", log)
        return BenchModel(model.pipe, "tiny-random", note)
    model = load_folder_model(spec.model.path, "demo")
    model.spec = spec
    model.upscaler = demo_upscaler(spec, device, dtype, log)
    return model


def load_folder_model(folder: Path, name: str) -> BenchModel:
    from rapid_diffusion.models.registry import load_pipeline

    return BenchModel(load_pipeline(folder, torch.device("cpu"), torch.float32), name)


def bench_upscaler(sr: str, device, dtype, tile: int | None = 256) -> Callable:
    """``rrdb23``: the paper's ESRGAN shape (RealESRGAN_x4plus, random weights: time does not depend
    on their values); anything else: an ESRGAN checkpoint path."""
    from rapid_diffusion.upscaling.esrgan import RRDBNet, Upscaler, load_sr_model

    model = RRDBNet(num_feat=64, num_block=23, num_grow_ch=32) if sr == "rrdb23" else load_sr_model(Path(sr))
    return Upscaler(model.eval(), device, dtype, tile=tile)


def demo_upscaler(spec, device, dtype, log: Callable[[str], None]) -> Callable | None:
    """The domain's ESRGAN upscaler when the upscale module and its weights are available."""
    try:
        from rapid_diffusion.upscaling.esrgan import upscaler_for
    except ImportError:
        return None
    return upscaler_for(spec, device, dtype, log=log)


def native_side(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def bench_spec(model: BenchModel, height: int, width: int, config: BenchConfig):
    from dataclasses import replace

    from rapid_diffusion.domains import ModelSource
    from rapid_diffusion.models.registry import adhoc_spec

    spec = model.spec or adhoc_spec(ModelSource(path=Path(model.name)))
    return replace(spec, height=height, width=width, num_inference_steps=config.steps, guidance_scale=config.guidance_scale)


def prepare_level(
    model: BenchModel, level: str, device, dtype, height, width, log, max_images: int = 1, sizes=None
) -> tuple[object, LevelRecord]:
    """A fresh copy of the weights on ``device``, optimised for ``level`` (warm-up included).

    ``openvino-bf16`` is the ``openvino`` level with the bf16 precision hint, to show its pixels.
    """
    pipe = copy.deepcopy(model.pipe).to(device, dtype)
    record = LevelRecord(requested=level)
    start = time.perf_counter()
    precision = "bf16" if level == OPENVINO_BF16 else None
    record.applied = apply_optimization(
        pipe, "openvino" if precision else level, log=log, height=height, width=width,
        max_images=max_images, precision=precision, sizes=sizes,
    )
    if precision:
        record.applied += "-bf16"
    record.setup_s = synchronized(start, device)
    log(f"level '{level}': applied '{record.applied}' in {record.setup_s:.1f}s")
    return pipe, record


def plain_call(pipe, config: BenchConfig, height: int, width: int, count: int = 1) -> np.ndarray:
    """Exactly what a diffusers user writes: ``pipe(prompt, ...)``; image i seeded with seed + i."""
    return pipe(
        config.prompt,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        height=height,
        width=width,
        num_images_per_prompt=count,
        generator=[torch.Generator("cpu").manual_seed(config.seed + i) for i in range(count)],
        output_type="np",
    ).images


def time_round(pipe, record: LevelRecord, config, height, width, spec, upscaler, device) -> np.ndarray:
    from rapid_diffusion.generation.pipeline import generate
    from rapid_diffusion.generation.request import GenerationRequest

    start = time.perf_counter()
    images = plain_call(pipe, config, height, width)
    record.end_to_end.append(synchronized(start, device))
    request = GenerationRequest(prompt=config.prompt, seed=config.seed, super_resolution=upscaler is not None)
    [result] = generate(pipe, [request], spec=spec, upscaler=upscaler)
    for stage, seconds in result.timings.items():
        record.stages.setdefault(stage, []).append(seconds)
    record.unet_evaluations = len(pipe.scheduler.timesteps)
    return images


def measure_peak_memory(pipe, config, height, width, device) -> tuple[float, float]:
    """(peak, before) MB around one generation: the CUDA allocator, or the process RSS.

    Every level's weights stay resident during the benchmark, so ``peak - before`` is what one
    generation adds, and ``before`` grows by each level's copy of the weights.
    """
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        plain_call(pipe, config, height, width)
        return torch.cuda.max_memory_allocated(device) / 2**20, before
    before = process_memory_mb("VmRSS:")
    reset_rss_peak()
    plain_call(pipe, config, height, width)
    return rss_peak_mb(), before


def reset_rss_peak() -> None:
    """Linux lets a process reset its RSS high-water mark; elsewhere the peak stays cumulative."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def process_memory_mb(field_name: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS:``, ``VmHWM:``) in MB; 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_peak_mb() -> float:
    """The RSS high-water mark: ``VmHWM`` (resettable) or ``getrusage``'s ``ru_maxrss``."""
    return process_memory_mb("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


UNET_PARTS = ("Attention", "ResnetBlock2D")


def unet_profile(pipe, config, height, width, device) -> dict:
    """Where UNet time goes (like the paper's Figure 2): attention, resnet blocks, the rest."""
    totals = {part: 0.0 for part in UNET_PARTS} | {"unet": 0.0}
    handles = [hook_timer(pipe.unet, "unet", totals, device)]
    for module in pipe.unet.modules():
        name = type(module).__name__
        if name in UNET_PARTS:
            handles.append(hook_timer(module, name, totals, device))
    try:
        plain_call(pipe, config, height, width)
    finally:
        for pre, post in handles:
            pre.remove()
            post.remove()
    other = totals["unet"] - sum(totals[part] for part in UNET_PARTS)
    seconds = {"attention": totals["Attention"], "resnet": totals["ResnetBlock2D"], "other": other}
    return {
        "unet_s": totals["unet"],
        "seconds": seconds,
        "share": {part: value / totals["unet"] for part, value in seconds.items()} if totals["unet"] else {},
    }


def hook_timer(module, name: str, totals: dict, device):
    starts = []

    def before(*_):
        sync(device)
        starts.append(time.perf_counter())

    def after(*_):
        sync(device)
        totals[name] += time.perf_counter() - starts.pop()

    return module.register_forward_pre_hook(before), module.register_forward_hook(after)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(start: float, device) -> float:
    sync(device)
    return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def summarize(config, model, device, dtype, height, width, records: dict[str, LevelRecord]) -> dict:
    levels = {}
    for level, record in records.items():
        unet_median = statistics.median(record.stages["unet"])
        levels[level] = {
            "requested": record.requested,
            "applied": record.applied,
            "setup_s": record.setup_s,
            "end_to_end_s": spread(record.end_to_end),
            "stages_s": {stage: spread(values) for stage, values in record.stages.items()},
            "unet_it_s": record.unet_evaluations / unet_median if unet_median else None,
            "peak_memory_mb": record.peak_memory_mb,
            "memory_before_mb": record.memory_before_mb,
            "profile": record.profile,
            "max_abs_diff_vs_plain": record.max_abs_diff_vs_plain,
        }
    plain = levels["none"]["end_to_end_s"]["median"]
    best = min(levels, key=lambda name: levels[name]["end_to_end_s"]["median"])
    for entry in levels.values():
        entry["speedup"] = plain / entry["end_to_end_s"]["median"]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "config": asdict(config),
        "model": model.name,
        "model_note": model.note,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "height": height,
        "width": width,
        "levels": levels,
        "best_level": best,
        "speedup": plain / levels[best]["end_to_end_s"]["median"],
    }


def machine_info(device) -> dict:
    import diffusers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


SD15_ATTENTION = ((4096, 40), (1024, 80), (256, 160))  # (tokens, head dim) per UNet level at 512x512


def head_dim_padding_bench(device, dtype, pad_multiple: int = 32, repeats: int = 5) -> dict:
    """Milliseconds of one SD1.5 self-attention call per UNet level, head dim as is and padded.

    On CPU the token counts are divided by 4 (a 256x256 image) to keep the run short.
    """
    from rapid_diffusion.speed.attention import DispatchAttnProcessor, best_backend

    processor = DispatchAttnProcessor(best_backend(device, dtype))
    padded = DispatchAttnProcessor(processor.backend, pad_multiple)
    shrink = 1 if device.type == "cuda" else 4
    results = {}
    for tokens, head_dim in SD15_ATTENTION:
        shape = (2, tokens // shrink, 8, head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        results[str(head_dim)] = {
            "backend": processor.backend,
            "shape": list(shape),
            "padded_to": shape[-1] + (-head_dim % pad_multiple),
            "unpadded_ms": attention_ms(processor, q, k, v, device, repeats),
            "padded_ms": attention_ms(padded, q, k, v, device, repeats),
        }
    return results


def attention_ms(processor, q, k, v, device, repeats: int) -> float:
    with torch.inference_mode():
        processor.attend(q, k, v, None)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            processor.attend(q, k, v, None)
            times.append(synchronized(start, device))
    return statistics.median(times) * 1000


def padding_table(result: dict) -> str:
    rows = ["| head dim | q/k/v shape | padded to | unpadded ms | padded ms |", "|---|---|---|---|---|"]
    for head_dim, entry in result.get("attention_padding", {}).items():
        rows.append(
            f"| {head_dim} | {tuple(entry['shape'])} | {entry['padded_to']} "
            f"| {entry['unpadded_ms']:.2f} | {entry['padded_ms']:.2f} |"
        )
    return "\n".join(rows)


def markdown_table(result: dict) -> str:
    """The result as a markdown table: one row per level, seconds as median (min-max)."""
    header = (
        "| level | applied | setup s | end-to-end s | text encoder s | UNet s | UNet it/s | VAE decode s | SR s "
        "| peak MB (+run) | max abs diff | speedup |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for level, entry in result["levels"].items():
        stages = entry["stages_s"]
        rows.append(
            f"| {level} | {entry['applied']} | {entry.get('setup_s', 0.0):.1f} | {fmt_spread(entry['end_to_end_s'])} "
            f"| {fmt_spread(stages.get('text_encoder'))} | {fmt_spread(stages.get('unet'))} "
            f"| {entry['unet_it_s']:.1f} | {fmt_spread(stages.get('vae_decode'))} "
            f"| {fmt_spread(stages.get('super_resolution'))} | {fmt_memory(entry)} "
            f"| {entry['max_abs_diff_vs_plain']:.2g} | {entry['speedup']:.2f}x |"
        )
    return "\n".join(rows)


def fmt_memory(entry: dict) -> str:
    """Peak MB, and in brackets what one generation adds to the memory in use before it."""
    added = entry["peak_memory_mb"] - entry.get("memory_before_mb", entry["peak_memory_mb"])
    return f"{entry['peak_memory_mb']:.0f} (+{added:.0f})"


def fmt_spread(values: dict | None) -> str:
    if not values:
        return "-"
    return f"{values['median']:.3f} ({values['min']:.3f}-{values['max']:.3f})"


def profile_table(result: dict) -> str:
    rows = ["| level | UNet s (1 run) | attention | resnet | other |", "|---|---|---|---|---|"]
    for level, entry in result["levels"].items():
        profile = entry["profile"]
        if not profile or not profile["share"]:
            continue
        share = profile["share"]
        rows.append(
            f"| {level} | {profile['unet_s']:.3f} | {share['attention']:.0%} | {share['resnet']:.0%} | {share['other']:.0%} |"
        )
    return "\n".join(rows)


DEFAULT_SHAPE_SIZES = ((64, 64), (128, 128))


def run_shapes(config: BenchConfig, log: Callable[[str], None] = print, max_images: int = 4, sizes=DEFAULT_SHAPE_SIZES) -> dict:
    """First-call and steady latency of every (images per request, size) after each level's warm-up.

    A first call much slower than the steady one means the request compiled something while
    its user waited; ``worst_first_over_steady`` is the largest such ratio per level.
    """
    device = torch.device(config.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = load_bench_model(config.model, log, device, dtype)
    sizes = [tuple(size) for size in sizes]
    levels = {}
    for level in config.levels:
        pipe, record = prepare_level(model, level, device, dtype, *sizes[0], log, max_images=max_images, sizes=sizes)
        rows = [shape_row(pipe, config, height, width, count, device) for height, width in sizes for count in range(1, max_images + 1)]
        levels[level] = {
            "applied": record.applied,
            "setup_s": record.setup_s,
            "shapes": rows,
            "worst_first_over_steady": max(row["first_over_steady"] for row in rows),
        }
        log(f"level '{level}': worst first/steady {levels[level]['worst_first_over_steady']:.2f}")
        del pipe
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "config": asdict(config),
        "model": model.name,
        "levels": levels,
    }


def shape_row(pipe, config: BenchConfig, height: int, width: int, count: int, device) -> dict:
    start = time.perf_counter()
    plain_call(pipe, config, height, width, count)
    first = synchronized(start, device)
    steady = []
    for _ in range(config.runs):
        start = time.perf_counter()
        plain_call(pipe, config, height, width, count)
        steady.append(synchronized(start, device))
    median = statistics.median(steady)
    return {"height": height, "width": width, "images": count, "first_s": first, "steady_s": spread(steady),
            "first_over_steady": first / median}


def shapes_table(result: dict) -> str:
    rows = ["| level | size | images | first call s | steady s | first / steady |", "|---|---|---|---|---|---|"]
    for level, entry in result["levels"].items():
        for row in entry["shapes"]:
            rows.append(
                f"| {level} ({entry['applied']}) | {row['width']}x{row['height']} | {row['images']} "
                f"| {row['first_s']:.3f} | {fmt_spread(row['steady_s'])} | {row['first_over_steady']:.2f} |"
            )
    return "\n".join(rows)


RESTART_CHILD = """
import json, sys, time
start = time.perf_counter()
from rapid_diffusion_dev.bench.speed import restart_setup
print("RESULT " + json.dumps(restart_setup(*json.loads(sys.argv[1]), process_start=start)))
"""


def restart_setup(model_name: str, level: str, threads: int | None, process_start: float) -> dict:
    """In a fresh process: load the model and optimise it as a server start would (warm-up included)."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_bench_model(model_name, lambda message: None)
    loaded = time.perf_counter()
    side = native_side(model.pipe)
    messages: list[str] = []
    applied = apply_optimization(model.pipe, level, log=messages.append, height=side, width=side, max_images=4)
    done = time.perf_counter()
    return {"applied": applied, "load_s": loaded - start, "optimise_s": done - loaded, "setup_s": done - start,
            "imports_s": start - process_start, "read_cache": any("read from the cache" in m for m in messages)}


def run_restart(config: BenchConfig, log: Callable[[str], None] = print, threads: int | None = None) -> dict:
    """Setup time of each level in fresh processes: with an empty cache (cold), then again with
    the cache the cold process left (warm). Each child gets its own empty inductor cache folder,
    so only this project's cache under ``RAPID_DIFFUSION_HOME`` can make the warm start faster."""
    import subprocess
    import sys

    levels = {}
    for level in (lv for lv in config.levels if lv != "none"):
        cold, warm = [], []
        for round_index in range(config.runs):
            with tempfile.TemporaryDirectory() as home:
                for label, runs in (("cold", cold), ("warm", warm)):
                    env = {**os.environ, "RAPID_DIFFUSION_HOME": home,
                           "TORCHINDUCTOR_CACHE_DIR": str(Path(home) / f"inductor-{label}")}
                    argument = json.dumps([config.model, level, threads])
                    done = subprocess.run([sys.executable, "-c", RESTART_CHILD, argument], env=env,
                                          capture_output=True, text=True, check=True)
                    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
                    runs.append(json.loads(line[len("RESULT "):]))
                    log(f"{level} {label} {round_index + 1}: setup {runs[-1]['setup_s']:.1f}s ({runs[-1]['applied']}"
                        f"{', read the cache' if runs[-1]['read_cache'] else ''})")
        cold_median = statistics.median(r["setup_s"] for r in cold)
        warm_median = statistics.median(r["setup_s"] for r in warm)
        levels[level] = {"cold": cold, "warm": warm, "cold_setup_s": cold_median, "warm_setup_s": warm_median,
                         "warm_over_cold": warm_median / cold_median}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "config": asdict(config),
        "levels": levels,
    }


def restart_table(result: dict) -> str:
    rows = ["| level | applied | cold setup s | warm setup s | warm / cold |", "|---|---|---|---|---|"]
    for level, entry in result["levels"].items():
        rows.append(
            f"| {level} | {entry['cold'][0]['applied']} | {entry['cold_setup_s']:.2f} | {entry['warm_setup_s']:.2f} "
            f"| {entry['warm_over_cold']:.0%} |"
        )
    return "\n".join(rows)
