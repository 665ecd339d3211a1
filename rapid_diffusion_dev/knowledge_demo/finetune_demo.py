"""Fine-tune the demo model with knowledge injection: the proof that the graph teaches entities.

Captions of the demo world name training entities instead of their colour and shape
(``左边有一个大的番茄`` for a big red circle on the left). The pairs are generated here (scenes of
the world, each with one entity caption) and trained by the product's trainer as ``train
--knowledge`` trains them (``training.trainer``: TransE on the graph, a zero projection, the UNet,
the text encoder and the projection on the diffusion loss); only the domain's title and examples
are the demo's own. Graph-only entities never appear in a caption: whatever the model draws for
them comes from their TransE vectors. ``with_knowledge=False`` is the control run (same captions,
no injection). The token embeddings learn at the model's rate (``embedding_lr_scale=1``); the
characters of graph-only entities get no gradient, as no caption has them.

    rapid-diffusion dev kg demo-finetune --out runs/demo-kg
    rapid-diffusion dev kg demo-eval --domain demo-kg
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from rapid_diffusion.demo import world
from rapid_diffusion.domains import write_domain_yaml
from rapid_diffusion.knowledge.graph import KnowledgeGraph
from rapid_diffusion.knowledge.injection import KNOWLEDGE_DIR
from rapid_diffusion.paths import DEMO_MODEL_DIR, SHIPPED_DOMAINS_DIR
from rapid_diffusion.training.options import TrainConfig
from rapid_diffusion.training.trainer import train

from .demo import DEMO_GRAPH, EntityCaptioner, load_split

PAIRS_SUFFIX = "-pairs"


@dataclass
class DemoFinetuneConfig:
    out: Path
    base: Path = DEMO_MODEL_DIR
    graph: Path = DEMO_GRAPH
    domain_id: str = "demo-kg"
    with_knowledge: bool = True
    steps: int = 600
    batch_size: int = 32
    lr: float = 5e-4
    projection_lr: float = 3e-3
    entity_probability: float = 0.7
    num_scenes: int = 3000
    seed: int = 0
    threads: int = 1


def write_entity_pairs(config: DemoFinetuneConfig, folder: Path) -> Path:
    """``num_scenes`` rendered scenes of the world's training split, each with one entity caption, as a pairs folder."""
    graph = KnowledgeGraph.load(config.graph)
    captioner = EntityCaptioner(graph, load_split(config.graph)["train"], config.entity_probability)
    rng = np.random.default_rng(config.seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(config.num_scenes):
        scene = world.sample_scene(rng, split="train")
        world.render(scene).save(folder / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": captioner(scene, rng)})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return folder


def train_config(config: DemoFinetuneConfig, data: Path) -> TrainConfig:
    """What ``rapid-diffusion train --knowledge`` runs for the demo: the recipe's rates and batch, no holdout,
    no prior pairs (the captions are the world's own), the UNet at every timestep, constant rate."""
    return TrainConfig(
        base=str(config.base), data=data, output=Path(config.out), domain_id=config.domain_id, name=config.domain_id,
        max_steps=config.steps, learning_rate=config.lr, batch_size=config.batch_size, gradient_accumulation_steps=1,
        knowledge=Path(config.graph) if config.with_knowledge else None, knowledge_lr=config.projection_lr,
        lr_scheduler="constant", lr_warmup_steps=0, holdout=0, validation_every=0, checkpoint_every=0,
        prior_preservation="off", unet_max_timestep=1000, embedding_lr_scale=1.0, seed=config.seed,
    )


def finetune_demo(config: DemoFinetuneConfig, log: Callable[[str], None] = print) -> Path:
    """Generate the entity pairs, train them with the product's trainer into ``config.out``, register the demo's domain."""
    torch.set_num_threads(config.threads)
    out = Path(config.out)
    data = write_entity_pairs(config, out.with_name(out.name + PAIRS_SUFFIX))
    result = train(train_config(config, data), log=log)
    if result.state != "done":
        raise RuntimeError(f"the knowledge fine-tune ended {result.state}; see {out / 'status.json'}")
    graph_dir = out / KNOWLEDGE_DIR if config.with_knowledge else Path(config.graph)
    write_domain(config, out, graph_dir)
    return out


def write_domain(config: DemoFinetuneConfig, model_dir: Path, graph_dir: Path) -> Path:
    base = yaml.safe_load((SHIPPED_DOMAINS_DIR / "demo.yaml").read_text(encoding="utf-8"))
    kind = "knowledge" if config.with_knowledge else "control, no injection"
    sr_path = (base.get("sr_weights") or {}).get("path")
    if sr_path:
        base["sr_weights"] = {"path": str((SHIPPED_DOMAINS_DIR / sr_path).resolve())}
    base.update(
        title={"zh": f"演示 + 知识图谱（{config.domain_id}）", "en": f"Demo + knowledge graph ({kind})"},
        description=f"The demo model fine-tuned {config.steps} steps on entity captions ({kind}).",
        model={"path": str(model_dir.resolve())},
        knowledge_graph=str(graph_dir.resolve()),
        examples=["中间有一个大的番茄", "中间有一个大的樱桃", "左边有一个杨桃"],
    )
    return write_domain_yaml(config.domain_id, {k: v for k, v in base.items() if k != "id"})
