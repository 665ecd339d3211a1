"""Prior preservation: pairs the base model draws from prompts outside the upload, trained on beside it.

A fine-tune on a few pictures of one new thing forgets what the base could draw (a red circle
on the left becomes two red blobs). DreamBooth's remedy (Ruiz et al. 2023; kohya's regularisation
images) is used as is: before training, the base model generates pairs from prompts that are not
about the new thing, and every step adds their loss, weighted (``core.prior_preservation_loss``).

The prompts (:func:`outside_prompts`): the base domain's example prompts, then the user's captions
with the new words taken out. **New words**, kept simple: runs of characters that no example prompt
of the base domain contains and that at least a third of the captions contain (the concept an
upload teaches is in most of its captions; a word only a few captions use is left alone), each grown
left and right while every caption holding it has the same next character (no segmenter needed). So
``左边有一个大的粉色圆形`` on the demo base loses 粉色 ("左边有一个大的圆形": a circle of the base's
own colour) and ``右边有一个小的红色半圆形`` loses 半圆形 ("右边有一个小的红色": something red, of the
base's own shape). Taking out only 半 left "…红色圆形" under nearly every prior pair, circles the
new word then had to be told apart from (benchmarks/README.md).

The number of prior pairs is fixed per base size (:data:`rapid_diffusion.training.options.PRIOR_IMAGES`),
so the tab's time estimate can include their generation before any upload. They are written to
``prior/`` in the run folder (``metadata.jsonl`` + PNGs, a folder the pair checker reads), once:
a resumed run trains on the very same pairs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from pathlib import Path

from PIL import Image

from ..domains import DomainSpec
from .pairs import Pair
from .options import TrainConfig
from .run_files import PRIOR_DIR, RunFiles
from .validation import Sampling, render, save_images

FALLBACK_EXAMPLES = ("一只猫", "一幅山水画", "一碗面条")  # a base without a domain (a folder or hub id) has no examples
PRIOR_SEED_OFFSET = 10_000  # prior images never share a seed with the before/after comparison's
METADATA = "metadata.jsonl"


def base_examples(base_spec: DomainSpec | None) -> list[str]:
    return list(base_spec.examples) if base_spec else list(FALLBACK_EXAMPLES)


def new_words(captions: list[str], examples: list[str]) -> list[str]:
    """Runs of characters no example contains, in at least a third of the captions, each grown to the
    whole phrase its captions agree on (longest first): 粉 -> 粉色, 半 -> 半圆形."""
    known = set("".join(examples))
    counts: dict[str, int] = {}
    for caption in captions:
        for run in set(re.findall(r"\S+", "".join(c if c not in known else " " for c in caption))):
            counts[run] = counts.get(run, 0) + 1
    needed = max(1, math.ceil(len(captions) / 3))
    words = {grown(run, [c for c in captions if run in c]) for run, count in counts.items() if count >= needed}
    return sorted(words, key=lambda w: (-len(w), w))


def grown(run: str, captions: list[str]) -> str:
    """``run`` extended left and right while every caption holding it has the same next character there."""
    word = run
    for step in (-1, 1):
        while True:
            neighbours = set()
            for caption in captions:
                at = caption.find(word)
                index = at - 1 if step < 0 else at + len(word)
                neighbours.add(caption[index] if 0 <= index < len(caption) and not caption[index].isspace() else None)
            if len(neighbours) != 1 or None in neighbours:
                break
            word = neighbours.pop() + word if step < 0 else word + neighbours.pop()
    return word


def without_words(caption: str, words: list[str]) -> str:
    for word in words:
        caption = caption.replace(word, "")
    return re.sub(r"\s+", " ", caption).strip(" ，,、")


def outside_prompts(captions: list[str], examples: list[str]) -> list[str]:
    """The base's examples, then the captions with the new words taken out (distinct, none equal to a caption)."""
    words = new_words(captions, examples)
    stripped = [without_words(caption, words) for caption in captions]
    uploaded = set(captions)
    return [p for p in dict.fromkeys([*examples, *stripped]) if p and p not in uploaded]


def comparison_prompts(examples: list[str], count: int) -> list[str]:
    """The prompts of the before/after comparison from outside the upload: the base's first examples."""
    return examples[:count]


def prior_plan(prompts: list[str], count: int, seed: int) -> list[tuple[str, int]]:
    """``count`` (prompt, seed) pairs, the prompts taken in turn, every image its own seed."""
    return [(prompts[i % len(prompts)], seed + PRIOR_SEED_OFFSET + i) for i in range(count)]


def read_prior_pairs(folder: Path, expected: list[tuple[str, int]]) -> bool:
    """Whether ``prior/`` holds exactly the planned pairs (a resumed run reuses them)."""
    path = Path(folder) / PRIOR_DIR / METADATA
    if not path.is_file():
        return False
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["text"], row["seed"]) for row in rows] == list(expected) and all((path.parent / row["file_name"]).is_file() for row in rows)


def generate_prior_pairs(components: dict, plan: list[tuple[str, int]], sampling: Sampling, device, autocast, files: RunFiles,
                         knowledge=None) -> Path:
    """Draw the planned pairs with the base model into ``prior/`` (images, then ``metadata.jsonl`` last)."""
    folder = files.folder / PRIOR_DIR
    if read_prior_pairs(files.folder, plan):
        return folder
    prompts, seeds = [p for p, _ in plan], [s for _, s in plan]
    started = time.time()
    files.update(state="generating", prior_done=0, prior_total=len(plan))
    images = render(components, prompts, seeds, sampling, device, autocast, knowledge,
                    progress=lambda done: files.update(prior_done=done))
    save_images(images, folder)
    rows = [{"file_name": f"{i}.png", "text": prompt, "seed": seed} for i, (prompt, seed) in enumerate(plan)]
    (folder / METADATA).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    files.update(prior_seconds=time.time() - started)
    return folder


def prior_pairs(output: Path) -> list[Pair]:
    """The prior pairs of a run folder, as the trainer's datasets take pairs."""
    folder = Path(output) / PRIOR_DIR
    pairs = []
    for line in (folder / METADATA).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        data = (folder / row["file_name"]).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
        pairs.append(Pair(f"{PRIOR_DIR}/{row['file_name']}", row["text"], data, size, hashlib.sha256(data).hexdigest()))
    return pairs


def wants_prior(config: TrainConfig) -> bool:
    return config.prior_preservation != "off"
