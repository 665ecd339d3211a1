"""Fine-tuning measurement: teach the demo model a shape word it has never seen, keep the old ones.

The new concept is 半圆形 (a half disc, flat side down): neither the word's first character nor
the shape occur in the demo world. A new *colour* cannot be taught this way: the frozen demo VAE
has learned the world's eight colours as a palette and decodes pink, cyan or brown as one of them
(``--check-colours`` prints its round trips), whereas it reconstructs a half disc faithfully.

24 pairs of the new shape (8 colours x 3 positions, random sizes, captions in the world's own
phrasings) plus 24 pairs of the old world go through ``rapid_diffusion.train`` (the code path of
``rapid-diffusion train`` and the Fine-tune tab). Before and after, through ``generate()`` with
the domain's defaults (2 seeds per prompt):

- new-shape rate: how often the largest object of a "…有一个<colour>的半圆形" prompt fits a half
  disc better than every world shape (the judge's own template fitting, one template more);
- old vocabulary: the judge's colour / shape / position scores on 12 ordinary world prompts.

    python benchmarks/finetune_new_concept.py --out runs/half-disc [--steps 300] [--lr 2e-4]
    python benchmarks/finetune_new_concept.py --out runs/quick --preset quick --threads 2   # as the Fine-tune tab runs it

``--preset`` trains exactly what the Fine-tune tab starts on its defaults (the preset's steps, rate
and batch, pairs held out for validation, samples and a checkpoint every fifth of the run); the
wall time it prints is what ``train_options.SECONDS_PER_STEP`` stores for the tab's estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

NEW_WORD = "半圆形"
POSITIONS = ("左", "中", "右", "上", "下")
SEEDS = (0, 1)
SCALES = (0.92, 1.0, 1.08)
OTHER_COLOURS = {"粉色": (250, 120, 200), "青色": (40, 200, 200), "棕色": (150, 90, 40)}


def half_disc(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A half disc with its flat side down, inside the box [cx-r, cx+r] x [cy-r/2, cy+r/2]."""
    return [(cx + r * math.cos(t), cy + r * (0.5 - math.sin(t))) for t in np.linspace(0, math.pi, 32)]


def render_half_disc(world, colour: str, cx: float, cy: float, r: float, background: int) -> Image.Image:
    big = world.IMAGE_SIZE * world.SUPERSAMPLE
    image = Image.new("RGB", (big, big), (background,) * 3)
    s = world.SUPERSAMPLE
    ImageDraw.Draw(image).polygon([(x * s, y * s) for x, y in half_disc(cx, cy, r)], fill=world.COLOURS[colour])
    return image.reduce(s)


def half_disc_mask(cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    image = Image.new("L", (size * 4, size * 4), 0)
    ImageDraw.Draw(image).polygon([(x * 4, y * 4) for x, y in half_disc(cx, cy, r)], fill=255)
    return np.asarray(image.reduce(4), dtype=np.float32) / 255.0


def largest_object_mask(judge, image) -> np.ndarray | None:
    """Coverage map (0/1) of the largest object the judge segments, or None."""
    pixels = judge._as_array(image)
    distance = np.sqrt(((pixels - judge.estimate_background(pixels)) ** 2).sum(axis=2))
    labels, count = judge.label_components(distance > judge.FOREGROUND_DISTANCE)
    if count == 0:
        return None
    component = labels == 1 + int(np.argmax([(labels == i).sum() for i in range(1, count + 1)]))
    return component.astype(np.float32) if component.sum() >= judge.MIN_AREA else None


def half_disc_fit(alpha: np.ndarray) -> float:
    """Best soft IoU of a half-disc template over the coverage map's bounding box (as ``judge.fit_shape``)."""
    ys, xs = np.nonzero(alpha >= 0.5)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    best = 0.0
    for scale in SCALES:
        r = ((x1 - x0) / 2 + (y1 - y0)) / 2 * scale
        template = half_disc_mask((x0 + x1) / 2, (y0 + y1) / 2, r)
        best = max(best, float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6)))
    return best


def is_half_disc(judge, image) -> bool:
    """True when the largest object fits a half disc better than every world shape (same map, same fitting)."""
    alpha = largest_object_mask(judge, image)
    return alpha is not None and half_disc_fit(alpha) > judge.fit_shape(alpha)[1]


def write_pairs(world, folder: Path, num_old: int) -> int:
    """24 half-disc pairs + ``num_old`` world pairs in a ``metadata.jsonl`` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, colour in enumerate(c for c in world.COLOUR_NAMES for _ in range(3)):
        size = world.SIZES[i % 2]
        position = POSITIONS[i % len(POSITIONS)]
        obj = world.SceneObject(colour, "圆形", size, position, *rng.uniform(-2, 2, 2), radius=float(rng.uniform(*world.RADII[size])))
        cx, cy = obj.centre
        render_half_disc(world, colour, cx, cy, obj.extent, int(rng.integers(*world.BACKGROUND_RANGE))).save(folder / f"new{i}.png")
        rows.append({"file_name": f"new{i}.png", "text": world.describe_object(obj, rng, shape_word=NEW_WORD)})
    for i in range(num_old):
        scene = world.sample_scene(rng, max_objects=1)
        world.render(scene).save(folder / f"old{i}.png")
        rows.append({"file_name": f"old{i}.png", "text": world.caption(scene, rng)})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def new_prompts(world) -> list[str]:
    """12 prompts: every colour, positions and sizes mixed, in the canonical phrasing."""
    return [
        f"{world.POSITION_WORDS[POSITIONS[i % 5]][0]}有一个{world.SIZES[i % 2]}的{world.COLOUR_NAMES[i % 8]}{NEW_WORD}"
        for i in range(12)
    ]


def measure(spec, registry, judge, world, generate, GenerationRequest) -> dict:
    new_hits = []
    for prompt in new_prompts(world):
        for image in generate(GenerationRequest(prompt=prompt, seed=SEEDS[0], num_images=len(SEEDS)), spec, registry=registry).images:
            new_hits.append(is_half_disc(judge, image))
    old_scenes = [world.sample_scene(np.random.default_rng(100 + i), max_objects=1) for i in range(12)]
    scores = []
    for scene in old_scenes:
        prompt = world.canonical_caption(scene)
        for image in generate(GenerationRequest(prompt=prompt, seed=SEEDS[0], num_images=len(SEEDS)), spec, registry=registry).images:
            scores.append(judge.judge(image, prompt))
    old = {k: float(np.mean([s.get(k, 0.0) for s in scores])) for k in ("colour", "shape", "position")}
    return {"new_shape_rate": float(np.mean(new_hits)), "new_shape_hits": [bool(h) for h in new_hits], "old": old}


def vae_round_trips(judge, world, vae) -> dict:
    """What the frozen VAE makes of a half disc (fits it?) and of colours outside the world (nearest RGB)."""
    from rapid_diffusion.demo.train_demo import to_tensor

    def round_trip(image: Image.Image) -> Image.Image:
        with torch.no_grad():
            y = vae.decode(vae.encode(to_tensor(np.array(image)[None])).latent_dist.mean).sample[0]
        return Image.fromarray(y.clamp(-1, 1).add(1).mul(127.5).round().permute(1, 2, 0).byte().numpy())

    shapes = [is_half_disc(judge, round_trip(render_half_disc(world, c, 32, 32, r, 130))) for c in world.COLOUR_NAMES for r in (7.0, 12.0)]
    colours = {}
    for name, rgb in OTHER_COLOURS.items():
        big = world.IMAGE_SIZE * world.SUPERSAMPLE
        image = Image.new("RGB", (big, big), (130,) * 3)
        ImageDraw.Draw(image).rectangle([big // 4, big // 4, 3 * big // 4, 3 * big // 4], fill=rgb)
        centre = np.asarray(round_trip(image.reduce(world.SUPERSAMPLE)), dtype=np.float32)[26:38, 26:38].reshape(-1, 3).mean(axis=0)
        colours[name] = {"rgb": list(rgb), "decoded": [round(float(v)) for v in centre]}
    return {"half_disc_kept": float(np.mean(shapes)), "other_colours": colours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-old", type=int, default=24, help="world pairs mixed in (keeps the old words)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", choices=("quick", "standard", "thorough"), default=None,
                        help="train as the Fine-tune tab does on this preset (overrides --steps/--lr/--batch-size)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAPID_DIFFUSION_HOME"] = str((args.out / "home").resolve())
    torch.set_num_threads(args.threads)

    from rapid_diffusion.demo import judge, world
    from rapid_diffusion.pipeline import GenerationRequest, generate
    from rapid_diffusion.registry import ModelRegistry
    from rapid_diffusion.train import TrainConfig, train
    from rapid_diffusion.train_options import preset_config, preset_for

    cpu = dict(device=torch.device("cpu"), dtype=torch.float32)
    registry = ModelRegistry(**cpu)
    spec = registry.spec("demo")
    round_trips = vae_round_trips(judge, world, registry.get(spec).pipe.vae)
    print(f"frozen VAE: half disc kept in {round_trips['half_disc_kept']:.0%} of round trips; other colours {round_trips['other_colours']}", flush=True)
    before = measure(spec, registry, judge, world, generate, GenerationRequest)
    print(f"before: new-shape rate {before['new_shape_rate']:.0%}, old {before['old']}", flush=True)

    pairs = write_pairs(world, args.out / "data", args.num_old)
    if args.preset:
        preset = preset_for(args.preset, spec.height)
        args.steps, args.lr, args.batch_size = preset.max_steps, preset.learning_rate, preset.batch_size
        config = preset_config(preset, base="demo", data=args.out / "data", output=args.out / "run", name="半圆形", domain_id="demo-half-disc")
    else:
        config = TrainConfig(
            base="demo", data=args.out / "data", output=args.out / "run", max_steps=args.steps, learning_rate=args.lr,
            batch_size=args.batch_size, gradient_accumulation_steps=1, checkpoint_every=0, validation_every=0,
            lr_warmup_steps=10, domain_id="demo-half-disc", random_flip=False, holdout=0,
        )
    start = time.time()
    result = train(config, log=lambda line: None)
    seconds = time.time() - start
    losses = result.losses
    print(f"train: {result.state}, {pairs} pairs, {args.steps} steps, {seconds:.0f} s, loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}", flush=True)

    tuned_registry = ModelRegistry(**cpu)
    after = measure(tuned_registry.spec("demo-half-disc"), tuned_registry, judge, world, generate, GenerationRequest)
    print(f"after: new-shape rate {after['new_shape_rate']:.0%}, old {after['old']}", flush=True)
    report = {
        "new_word": NEW_WORD, "vae_round_trips": round_trips, "pairs": pairs, "steps": args.steps, "lr": args.lr,
        "batch_size": args.batch_size, "preset": args.preset, "train_seconds": round(seconds, 1), "torch_threads": args.threads,
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "before": before, "after": after,
    }
    (args.out / "result.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"report: {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
