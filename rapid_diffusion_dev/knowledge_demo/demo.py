"""The demo world's knowledge proof: everyday entities whose colour and shape are world attributes.

``rapid_diffusion/data/assets/demo-kg`` holds the graph (``番茄 颜色 红色``, ``番茄 形状 圆形``, ...) and a split:
``train`` entities replace their colour and shape words in fine-tuning captions
(``左边有一个大的红色圆形`` -> ``左边有一个大的番茄``); ``graph_only`` entities never appear in
a caption and are what ``measure_entity_attributes`` evaluates: the judge reads the colour and
shape of the largest object in the image of ``中间有一个大的<entity>``, compared with the
graph's facts. Chance is 1/8 for colour and 1/6 for shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from rapid_diffusion.demo import judge, world
from rapid_diffusion.knowledge.graph import KnowledgeGraph
from rapid_diffusion.knowledge.transe import EntityEmbeddings
from rapid_diffusion.paths import DEMO_KNOWLEDGE_GRAPH

DEMO_GRAPH = DEMO_KNOWLEDGE_GRAPH
SPLIT_FILE = "split.tsv"
EVAL_TEMPLATE = "中间有一个大的{entity}"


def load_split(folder: Path = DEMO_GRAPH) -> dict[str, list[str]]:
    """``{"train": [...], "graph_only": [...]}`` from ``split.tsv``."""
    split: dict[str, list[str]] = {"train": [], "graph_only": []}
    for line in (folder / SPLIT_FILE).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            entity, name = line.split("\t")
            split[name.strip()].append(entity.strip())
    return split


def attributes(graph: KnowledgeGraph, entity: str) -> tuple[str, str]:
    facts = dict(graph.facts(entity))
    return facts["颜色"], facts["形状"]


class EntityCaptioner:
    """Rewrites world captions so that objects matching a training entity are named by it."""

    def __init__(self, graph: KnowledgeGraph, entities: list[str], probability: float = 0.5):
        self.probability = probability
        self.by_attributes: dict[tuple[str, str], list[str]] = {}
        for entity in entities:
            self.by_attributes.setdefault(attributes(graph, entity), []).append(entity)

    def __call__(self, scene: world.Scene, rng: np.random.Generator) -> str:
        text = world.caption(scene, rng)
        for obj in scene.objects:
            candidates = self.by_attributes.get((obj.colour, obj.shape))
            if candidates and rng.random() < self.probability:
                words = "|".join(sorted(world.SHAPE_WORDS[obj.shape], key=len, reverse=True))
                entity = candidates[int(rng.integers(len(candidates)))]
                sizes = "|".join(world.SIZE_WORDS[obj.size])
                text = re.sub(f"{obj.colour}的?(?:{sizes})?(?:{words})", entity, text, count=1)
        return text


@dataclass
class AttributeAccuracy:
    colour: float
    shape: float
    both: float
    per_entity: dict[str, dict[str, float]] = field(default_factory=dict)


def judge_objects(image: Image.Image) -> list[judge.DetectedObject]:
    """The judge's objects; a blob it cannot fit (it raises on an empty coverage map) counts as none."""
    try:
        return judge.judge_image(image)
    except ValueError:
        return []


def measure_entity_attributes(
    image_for: Callable[[str, int], Image.Image], graph: KnowledgeGraph, entities: list[str], seeds: list[int]
) -> AttributeAccuracy:
    """Judge the largest object of ``image_for(prompt, seed)`` against each entity's colour and shape."""
    per_entity = {}
    for entity in entities:
        colour, shape = attributes(graph, entity)
        hits = {"colour": 0.0, "shape": 0.0, "both": 0.0}
        for seed in seeds:
            found = judge_objects(image_for(EVAL_TEMPLATE.format(entity=entity), seed))
            right_colour = bool(found) and found[0].colour == colour
            right_shape = bool(found) and found[0].shape == shape
            hits["colour"] += right_colour / len(seeds)
            hits["shape"] += right_shape / len(seeds)
            hits["both"] += (right_colour and right_shape) / len(seeds)
        per_entity[entity] = hits
    mean = {k: sum(h[k] for h in per_entity.values()) / max(1, len(per_entity)) for k in ("colour", "shape", "both")}
    return AttributeAccuracy(mean["colour"], mean["shape"], mean["both"], per_entity)


def linear_probe_accuracy(embeddings: EntityEmbeddings, graph: KnowledgeGraph, split: dict[str, list[str]]) -> dict[str, float]:
    """How well the graph-only entities' colour and shape can be read from their TransE vectors
    by a linear map fitted (least squares) on the training entities alone: the generalisation the
    injection projection needs, measured without any diffusion training."""
    rows = {name: i for i, name in enumerate(embeddings.entities)}

    def features(entities: list[str]) -> torch.Tensor:
        vectors = embeddings.entity_vectors[[rows[e] for e in entities]].float()
        return torch.cat([vectors, torch.ones(len(entities), 1)], dim=1)

    result = {}
    for slot, (name, classes) in enumerate((("colour", world.COLOUR_NAMES), ("shape", world.SHAPES))):
        labels = {e: classes.index(attributes(graph, e)[slot]) for e in split["train"] + split["graph_only"]}
        targets = torch.nn.functional.one_hot(torch.tensor([labels[e] for e in split["train"]]), len(classes)).float()
        weights = torch.linalg.lstsq(features(split["train"]), targets, driver="gelsd").solution
        predicted = (features(split["graph_only"]) @ weights).argmax(dim=1)
        result[name] = (predicted == torch.tensor([labels[e] for e in split["graph_only"]])).float().mean().item()
    return result
