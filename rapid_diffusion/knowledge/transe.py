"""TransE (Bordes et al., 2013): entities and relations as vectors with ``h + r ≈ t``.

Trained with the margin ranking loss ``max(0, margin + d(h, r, t) - d(h', r, t'))`` where
``(h', r, t')`` corrupts the head or the tail of a true triple with a random entity, and
entity vectors are renormalised to unit L2 norm before each batch (the paper's constraint,
which keeps the loss from being lowered by inflating norms). Adam replaces the paper's SGD:
it converges in far fewer epochs on small domain graphs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .graph import KnowledgeGraph


@dataclass(frozen=True)
class TransEConfig:
    dim: int = 64
    epochs: int = 300
    learning_rate: float = 0.01
    margin: float = 1.0
    p_norm: int = 1
    batch_size: int = 512
    seed: int = 0


class TransE(nn.Module):
    def __init__(self, num_entities: int, num_relations: int, dim: int, p_norm: int = 1):
        super().__init__()
        self.p_norm = p_norm
        self.entity = nn.Embedding(num_entities, dim)
        self.relation = nn.Embedding(num_relations, dim)
        bound = 6 / math.sqrt(dim)
        nn.init.uniform_(self.entity.weight, -bound, bound)
        nn.init.uniform_(self.relation.weight, -bound, bound)
        with torch.no_grad():
            self.relation.weight.div_(self.relation.weight.norm(dim=-1, keepdim=True))
        self.normalize_entities()

    @torch.no_grad()
    def normalize_entities(self) -> None:
        self.entity.weight.div_(self.entity.weight.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def distance(self, triples: torch.Tensor) -> torch.Tensor:
        """``||h + r - t||_p`` for a ``(n, 3)`` tensor of (head, relation, tail) indices."""
        h, r, t = self.entity(triples[:, 0]), self.relation(triples[:, 1]), self.entity(triples[:, 2])
        return (h + r - t).norm(p=self.p_norm, dim=-1)

    def all_tail_distances(self, triples: torch.Tensor) -> torch.Tensor:
        """Distances ``(n, num_entities)`` of every entity as the tail of ``(h, r, ?)``."""
        query = self.entity(triples[:, 0]) + self.relation(triples[:, 1])
        return torch.cdist(query, self.entity.weight, p=self.p_norm)

    def all_head_distances(self, triples: torch.Tensor) -> torch.Tensor:
        """Distances ``(n, num_entities)`` of every entity as the head of ``(?, r, t)``."""
        query = self.entity(triples[:, 2]) - self.relation(triples[:, 1])
        return torch.cdist(query, self.entity.weight, p=self.p_norm)


def corrupt(triples: torch.Tensor, num_entities: int, generator: torch.Generator) -> torch.Tensor:
    """Replace the head or the tail (a coin flip per triple) with a uniformly random entity."""
    n = len(triples)
    replace_head = torch.rand(n, generator=generator) < 0.5
    random_entities = torch.randint(num_entities, (n,), generator=generator)
    corrupted = triples.clone()
    corrupted[replace_head, 0] = random_entities[replace_head]
    corrupted[~replace_head, 2] = random_entities[~replace_head]
    return corrupted


def train_transe(
    graph: KnowledgeGraph, config: TransEConfig = TransEConfig(), log: Callable[[str], None] | None = None
) -> tuple[TransE, float]:
    """Train TransE on every triple of ``graph``; returns the model and the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    triples = torch.tensor(graph.index_triples(), dtype=torch.long)
    model = TransE(len(graph.entities), len(graph.relations), config.dim, config.p_norm)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_value = float("nan")
    for epoch in range(config.epochs):
        order = torch.randperm(len(triples), generator=generator)
        total = 0.0
        for batch in triples[order].split(config.batch_size):
            model.normalize_entities()
            negatives = corrupt(batch, len(graph.entities), generator)
            loss = torch.relu(config.margin + model.distance(batch) - model.distance(negatives)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        loss_value = total / len(triples)
        if log is not None and (epoch + 1) % max(1, config.epochs // 10) == 0:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {loss_value:.4f}")
    model.normalize_entities()
    return model, loss_value


@dataclass(frozen=True)
class LinkPrediction:
    """Filtered ranks of the true head and tail among all entities (1 = best)."""

    mean_rank: float
    hits_at_1: float
    hits_at_10: float
    num_entities: int

    @property
    def chance_mean_rank(self) -> float:
        return (self.num_entities + 1) / 2


@torch.no_grad()
def evaluate_link_prediction(model: TransE, triples: list[tuple[int, int, int]], known: set[tuple[int, int, int]]) -> LinkPrediction:
    """Rank each triple's tail (and head) against all entities, other known triples filtered out."""
    tensor = torch.tensor(triples, dtype=torch.long)
    ranks = []
    for distances, slot in ((model.all_tail_distances(tensor), 2), (model.all_head_distances(tensor), 0)):
        for row, triple in zip(distances, triples):
            target = triple[slot]
            others = [e for e in range(len(row)) if e != target and _with_slot(triple, slot, e) in known]
            row = row.clone()
            row[others] = float("inf")
            ranks.append(int((row < row[target]).sum()) + 1)
    ranks_t = torch.tensor(ranks, dtype=torch.float)
    return LinkPrediction(
        mean_rank=ranks_t.mean().item(),
        hits_at_1=(ranks_t <= 1).float().mean().item(),
        hits_at_10=(ranks_t <= 10).float().mean().item(),
        num_entities=model.entity.num_embeddings,
    )


def _with_slot(triple: tuple[int, int, int], slot: int, entity: int) -> tuple[int, int, int]:
    values = list(triple)
    values[slot] = entity
    return tuple(values)


@dataclass
class EntityEmbeddings:
    """Trained vectors with their names: the file ``kg train`` writes (safetensors)."""

    entities: list[str]
    relations: list[str]
    entity_vectors: torch.Tensor
    relation_vectors: torch.Tensor
    p_norm: int = 1

    @property
    def dim(self) -> int:
        return self.entity_vectors.shape[1]

    @classmethod
    def from_model(cls, model: TransE, graph: KnowledgeGraph) -> "EntityEmbeddings":
        return cls(
            list(graph.entities),
            list(graph.relations),
            model.entity.weight.detach().clone(),
            model.relation.weight.detach().clone(),
            model.p_norm,
        )

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"entity_embeddings": self.entity_vectors.contiguous(), "relation_embeddings": self.relation_vectors.contiguous()}
        metadata = {
            "entities": json.dumps(self.entities, ensure_ascii=False),
            "relations": json.dumps(self.relations, ensure_ascii=False),
            "p_norm": str(self.p_norm),
            "format": "rapid_diffusion.transe.v1",
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: Path) -> "EntityEmbeddings":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "entities" not in metadata:
            raise ValueError(f"{path} is not a TransE embeddings file (no entity names in its metadata)")
        tensors = load_file(str(path))
        return cls(
            json.loads(metadata["entities"]),
            json.loads(metadata["relations"]),
            tensors["entity_embeddings"],
            tensors["relation_embeddings"],
            int(metadata.get("p_norm", "1")),
        )
