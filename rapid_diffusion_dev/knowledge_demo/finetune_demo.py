"""Fine-tune the demo model with knowledge injection: the proof that the graph teaches entities.

Captions of the demo world name training entities instead of their colour and shape
(``左边有一个大的番茄`` for a big red circle on the left); the UNet, the text encoder and the
injection projection are trained together on the diffusion loss, exactly as ``train_demo``
trains the base model. Graph-only entities never appear in a caption: whatever the model
draws for them comes from their TransE vectors. ``with_knowledge=False`` is the control run
(same captions, no injection). Token embeddings stay frozen by default, so the characters of
training entities are no better known than those of graph-only ones: the only thing that sets
them apart is having been seen in captions.

    rapid-diffusion dev kg demo-finetune --out runs/demo-kg
    rapid-diffusion dev kg demo-eval --domain demo-kg
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from rapid_diffusion.demo import world
from rapid_diffusion.knowledge.graph import KnowledgeGraph
from rapid_diffusion.knowledge.injection import KNOWLEDGE_DIR, Knowledge, KnowledgeTextEncoder
from rapid_diffusion.knowledge.transe import EntityEmbeddings, TransEConfig, train_transe
from rapid_diffusion.paths import DEMO_MODEL_DIR, SHIPPED_DOMAINS_DIR
from rapid_diffusion.domains import write_domain_yaml
from rapid_diffusion.models.registry import load_pipeline
from rapid_diffusion.training.core import denoising_loss, make_ema

from ..recipes import train_demo
from .demo import DEMO_GRAPH, EntityCaptioner, load_split


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
    caption_dropout: float = 0.1
    num_scenes: int = 3000
    kg_dim: int = 64
    kg_epochs: int = 1000
    ema_decay: float = 0.99
    train_token_embeddings: bool = False
    seed: int = 0
    threads: int = 1
    log_every: int = 50


def build_knowledge(config: DemoFinetuneConfig, hidden_size: int, log: Callable[[str], None]) -> Knowledge:
    graph = KnowledgeGraph.load(config.graph)
    model, loss = train_transe(graph, TransEConfig(dim=config.kg_dim, epochs=config.kg_epochs, seed=config.seed))
    log(f"TransE on {len(graph.entities)} entities: loss {loss:.4f}")
    return Knowledge.create(graph, EntityEmbeddings.from_model(model, graph), hidden_size)


@torch.no_grad()
def world_latents(vae, num_scenes: int, seed: int) -> tuple[torch.Tensor, list[world.Scene]]:
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, split="train") for _ in range(num_scenes)]
    images = np.stack([np.asarray(world.render(scene)) for scene in scenes])
    latents = train_demo.encode_latents(vae, images, "cpu")
    return latents * vae.config.scaling_factor, scenes


def finetune_demo(config: DemoFinetuneConfig, log: Callable[[str], None] = print) -> Path:
    """Fine-tune, save the pipeline (+ ``knowledge/``) in ``config.out`` and register a domain."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    pipe = load_pipeline(Path(config.base), torch.device("cpu"), torch.float32)
    knowledge = build_knowledge(config, pipe.text_encoder.config.hidden_size, log)
    latents, scenes = world_latents(pipe.vae, config.num_scenes, config.seed)
    captioner = EntityCaptioner(knowledge.graph, load_split(config.graph)["train"], config.entity_probability)
    encoder = KnowledgeTextEncoder(pipe.text_encoder, knowledge.injector).train()
    pipe.unet.train()
    pipe.text_encoder.get_input_embeddings().requires_grad_(config.train_token_embeddings)
    model_params = [p for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": model_params, "lr": config.lr}, {"params": knowledge.injector.parameters(), "lr": config.projection_lr}],
        weight_decay=0.0,
    )
    trained = (pipe.unet, pipe.text_encoder, knowledge.injector)
    averages = [make_ema(module, config.ema_decay) for module in trained]
    noise_schedule = train_demo.noise_scheduler(Path(config.base))
    rng = np.random.default_rng(config.seed + 1)
    generator = torch.Generator().manual_seed(config.seed + 2)
    start = time.time()
    for step in range(config.steps):
        index = rng.integers(len(scenes), size=config.batch_size)
        captions = ["" if rng.random() < config.caption_dropout else captioner(scenes[i], rng) for i in index]
        batch = knowledge.tokenize(pipe.tokenizer, captions)
        hidden = encoder(batch.input_ids, batch.entity_ids if config.with_knowledge else None)
        loss = denoising_loss(pipe.unet, noise_schedule, latents[index], hidden, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params + list(knowledge.injector.parameters()), 1.0)
        optimizer.step()
        for average, module in zip(averages, trained):
            average.step(module.parameters())
        if step % config.log_every == 0 or step == config.steps - 1:
            log(f"step {step + 1}/{config.steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    for average, module in zip(averages, trained):
        average.copy_to(module.parameters())
    return save(config, pipe, knowledge)


def save(config: DemoFinetuneConfig, pipe, knowledge: Knowledge) -> Path:
    out = Path(config.out)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    graph_dir = knowledge.save(out / KNOWLEDGE_DIR) if config.with_knowledge else Path(config.graph).resolve()
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
