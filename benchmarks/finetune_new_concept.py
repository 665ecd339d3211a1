"""Fine-tuning measurement: teach the demo model a colour word it has never seen, keep the old ones.

24 pairs of a new colour (粉色, pink (250, 120, 200): 6 shapes x 4 positions, captions in the
world's own phrasings) plus 24 pairs of the old world go through ``rapid_diffusion.train`` (the
code path of ``rapid-diffusion train`` and the Fine-tune tab). Before and after, through
``generate()`` with the domain's defaults:

- new-colour rate: how often the main object of a "…粉色的…" prompt is nearest to pink (among the
  world's 8 colours, pink and grey);
- old vocabulary: the judge's colour / shape / position scores on 12 ordinary world prompts.

The VAE stays frozen, so the script first checks that it can round-trip pink at all.

    python benchmarks/finetune_new_concept.py --out runs/pink [--steps 300] [--lr 2e-4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

NEW_WORD = "粉色"
NEW_RGB = (250, 120, 200)
GREY = (130, 130, 130)
POSITIONS = ("左", "中", "右", "上")
SEEDS = (0, 1)


def render_new(world, obj, background: int) -> Image.Image:
    big = world.IMAGE_SIZE * world.SUPERSAMPLE
    image = Image.new("RGB", (big, big), (background,) * 3)
    world.draw_object(ImageDraw.Draw(image), obj, NEW_RGB, world.SUPERSAMPLE)
    return image.reduce(world.SUPERSAMPLE)


def write_pairs(world, folder: Path, num_old: int) -> int:
    """24 new-colour pairs + ``num_old`` world pairs in a ``metadata.jsonl`` folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (shape, position) in enumerate((s, p) for s in world.SHAPES for p in POSITIONS):
        size = str(rng.choice(world.SIZES))
        obj = world.SceneObject(NEW_WORD, shape, size, position, *rng.uniform(-2, 2, 2))
        render_new(world, obj, int(rng.integers(*world.BACKGROUND_RANGE))).save(folder / f"new{i}.png")
        rows.append({"file_name": f"new{i}.png", "text": world.describe_object(obj, rng)})
    for i in range(num_old):
        scene = world.sample_scene(rng, max_objects=1)
        world.render(scene).save(folder / f"old{i}.png")
        rows.append({"file_name": f"old{i}.png", "text": world.caption(scene, rng)})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def main_object_colour(judge, world, image) -> str:
    """Nearest of the world's colours, pink and grey to the largest foreground object's mean RGB."""
    pixels = judge._as_array(image)
    distance = np.sqrt(((pixels - judge.estimate_background(pixels)) ** 2).sum(axis=2))
    labels, count = judge.label_components(distance > judge.FOREGROUND_DISTANCE)
    if count == 0:
        return "none"
    largest = labels == 1 + int(np.argmax([(labels == i).sum() for i in range(1, count + 1)]))
    rgb = pixels[largest].mean(axis=0)
    palette = dict(world.COLOURS, **{NEW_WORD: NEW_RGB, "灰色": GREY})
    return min(palette, key=lambda name: float(((np.array(palette[name]) - rgb) ** 2).sum()))


def vae_round_trip_colour(judge, world, vae) -> str:
    from rapid_diffusion.demo.train_demo import to_tensor

    obj = world.SceneObject(NEW_WORD, "正方形", "大", "中")
    x = to_tensor(np.array(render_new(world, obj, 130))[None])
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample[0].clamp(-1, 1).add(1).mul(127.5).round()
    return main_object_colour(judge, world, Image.fromarray(y.permute(1, 2, 0).byte().numpy()))


def measure(spec, registry, judge, world, generate, GenerationRequest) -> dict:
    new_prompts = [f"{world.POSITION_WORDS[p][0]}有一个{NEW_WORD}的{s}" for s, p in zip(world.SHAPES, "左中右上下中")]
    old_scenes = [world.sample_scene(np.random.default_rng(100 + i), max_objects=1) for i in range(12)]
    hits, colours = [], []
    for prompt in new_prompts:
        for seed in SEEDS:
            image = generate(GenerationRequest(prompt=prompt, seed=seed), spec, registry=registry).images[0]
            colours.append(main_object_colour(judge, world, image))
            hits.append(colours[-1] == NEW_WORD)
    scores = []
    for scene in old_scenes:
        prompt = world.canonical_caption(scene)
        for seed in SEEDS:
            image = generate(GenerationRequest(prompt=prompt, seed=seed), spec, registry=registry).images[0]
            scores.append(judge.judge(image, prompt))
    old = {k: float(np.mean([s.get(k, 0.0) for s in scores])) for k in ("colour", "shape", "position")}
    return {"new_colour_rate": float(np.mean(hits)), "new_prompt_colours": colours, "old": old}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-old", type=int, default=24, help="world pairs mixed in (keeps the old words)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAPID_DIFFUSION_HOME"] = str((args.out / "home").resolve())
    torch.set_num_threads(args.threads)

    from rapid_diffusion.demo import judge, world
    from rapid_diffusion.pipeline import GenerationRequest, generate
    from rapid_diffusion.registry import ModelRegistry
    from rapid_diffusion.train import TrainConfig, train

    cpu = dict(device=torch.device("cpu"), dtype=torch.float32)
    registry = ModelRegistry(**cpu)
    spec = registry.spec("demo")
    round_trip = vae_round_trip_colour(judge, world, registry.get(spec).pipe.vae)
    print(f"frozen VAE round trip of a {NEW_WORD} square: {round_trip}", flush=True)
    before = measure(spec, registry, judge, world, generate, GenerationRequest)
    print(f"before: new-colour rate {before['new_colour_rate']:.0%}, old {before['old']}", flush=True)

    pairs = write_pairs(world, args.out / "data", args.num_old)
    config = TrainConfig(
        base="demo", data=args.out / "data", output=args.out / "run", max_steps=args.steps, learning_rate=args.lr,
        batch_size=args.batch_size, checkpoint_every=0, validation_every=0, lr_warmup_steps=10, domain_id="demo-pink",
    )
    start = time.time()
    result = train(config, log=lambda line: None)
    seconds = time.time() - start
    losses = result.losses
    print(f"train: {result.state}, {pairs} pairs, {args.steps} steps, {seconds:.0f} s, loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}", flush=True)

    tuned_registry = ModelRegistry(**cpu)
    after = measure(tuned_registry.spec("demo-pink"), tuned_registry, judge, world, generate, GenerationRequest)
    print(f"after: new-colour rate {after['new_colour_rate']:.0%}, old {after['old']}", flush=True)
    report = {
        "vae_round_trip": round_trip, "pairs": pairs, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
        "train_seconds": round(seconds, 1), "torch_threads": args.threads,
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "before": before, "after": after,
    }
    (args.out / "result.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"report: {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
