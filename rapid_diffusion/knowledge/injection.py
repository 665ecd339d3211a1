"""Knowledge injection into the text encoder (CKCLIP's ``E_token + E_entity``).

Each entity mention linked in the prompt adds ``projection(TransE vector)`` to the input
token embeddings of the tokens it covers, before the transformer. The projection starts at
zero, so a pretrained encoder is unchanged until fine-tuning trains it. The addition is done
by a forward hook on the encoder's input embedding layer, held only during one call, so the
model's own forward (positions, causal mask, pooling) runs unchanged.

A model folder carries its knowledge in ``knowledge/``: the projection, the TransE vectors
and the graph files, all plain text or safetensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .graph import KnowledgeGraph
from .linking import EntityLinker, EntitySpan, span_token_positions
from .transe import EntityEmbeddings

KNOWLEDGE_DIR = "knowledge"
PROJECTION_FILE = "projection.safetensors"
EMBEDDINGS_FILE = "entity_embeddings.safetensors"
NO_ENTITY = -1

logger = logging.getLogger(__name__)


class EntityInjector(nn.Module):
    """Frozen TransE vectors (a buffer) and the trainable projection into token space."""

    def __init__(self, entity_vectors: torch.Tensor, hidden_size: int):
        super().__init__()
        self.register_buffer("entity_vectors", entity_vectors.detach().clone(), persistent=False)
        self.projection = nn.Linear(entity_vectors.shape[1], hidden_size)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def forward(self, entity_ids: torch.Tensor) -> torch.Tensor:
        """``(batch, tokens)`` entity rows (``NO_ENTITY`` = none) -> ``(batch, tokens, hidden)``."""
        linked = entity_ids != NO_ENTITY
        vectors = self.entity_vectors[entity_ids.clamp_min(0)].to(self.projection.weight.dtype)
        return self.projection(vectors) * linked.unsqueeze(-1).to(self.projection.weight.dtype)


class KnowledgeTextEncoder(nn.Module):
    """A text encoder whose input token embeddings get the linked entities' projections.

    ``forward(input_ids, entity_ids, attention_mask=None)`` returns the last hidden states,
    exactly what the plain encoder returns when ``entity_ids`` is None or all ``NO_ENTITY``
    or the projection is zero.
    """

    def __init__(self, text_encoder: nn.Module, injector: EntityInjector):
        super().__init__()
        self.text_encoder = text_encoder
        self.injector = injector

    def forward(
        self, input_ids: torch.Tensor, entity_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if entity_ids is None:
            return self.text_encoder(input_ids, attention_mask=attention_mask)[0]
        delta = self.injector(entity_ids.to(input_ids.device))
        hook = self.text_encoder.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output + delta.to(output.dtype)
        )
        # An accelerated text encoder (speed.openvino) reads this flag and runs torch, which honours the hook.
        self.text_encoder.needs_torch_forward = True
        try:
            return self.text_encoder(input_ids, attention_mask=attention_mask)[0]
        finally:
            hook.remove()
            self.text_encoder.needs_torch_forward = False


@dataclass
class TokenizedPrompts:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    entity_ids: torch.Tensor
    spans: list[list[EntitySpan]]


class Knowledge:
    """A graph, its entities' TransE vectors and the injector: everything a model needs."""

    def __init__(self, graph: KnowledgeGraph, embeddings: EntityEmbeddings, injector: EntityInjector):
        self.graph = graph
        self.embeddings = embeddings
        self.injector = injector
        self.linker = EntityLinker(graph.surface_forms())
        self.entity_rows = {name: i for i, name in enumerate(embeddings.entities)}

    @classmethod
    def create(cls, graph: KnowledgeGraph, embeddings: EntityEmbeddings, hidden_size: int) -> "Knowledge":
        """Fresh knowledge for a text encoder of ``hidden_size``: zero projection (a no-op)."""
        return cls(graph, embeddings, EntityInjector(embeddings.entity_vectors, hidden_size))

    @classmethod
    def load(cls, folder: Path, graph_path: Path | None = None) -> "Knowledge":
        """Load ``folder`` (a model's ``knowledge/``); ``graph_path`` overrides its graph files."""
        folder = Path(folder)
        embeddings = EntityEmbeddings.load(folder / EMBEDDINGS_FILE)
        weights = load_file(str(folder / PROJECTION_FILE))
        hidden_size = weights["projection.weight"].shape[0]
        knowledge = cls.create(KnowledgeGraph.load(graph_path or folder), embeddings, hidden_size)
        knowledge.injector.load_state_dict(weights)
        return knowledge

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        self.graph.save(folder)
        self.embeddings.save(folder / EMBEDDINGS_FILE)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.injector.state_dict().items()}
        save_file(state, str(folder / PROJECTION_FILE), metadata={"format": "rapid_diffusion.knowledge.v1"})
        return folder

    def link(self, text: str) -> list[EntitySpan]:
        return self.linker.link(text)

    def tokenize(self, tokenizer, texts: list[str], max_length: int | None = None) -> TokenizedPrompts:
        """Tokenize like diffusers' ``encode_prompt`` (padded to the window) and mark entity tokens."""
        encoded = tokenizer(
            texts,
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        entity_ids = torch.full_like(encoded["input_ids"], NO_ENTITY)
        all_spans = []
        for row, text in enumerate(texts):
            spans = self.link(text)
            all_spans.append(spans)
            positions = span_token_positions(encoded["offset_mapping"][row].tolist(), spans)
            for span, tokens in zip(spans, positions):
                entity_ids[row, tokens] = self.entity_rows.get(span.entity, NO_ENTITY)
        return TokenizedPrompts(encoded["input_ids"], encoded["attention_mask"], entity_ids, all_spans)


def describe_entities(knowledge: Knowledge, prompt: str) -> list[str]:
    """One line per linked entity the graph knows facts of, e.g. ``番茄 → 颜色: 红色；形状: 圆形``."""
    first_mentions: dict[str, str] = {}
    for span in knowledge.link(prompt):
        first_mentions.setdefault(span.entity, span.text)
    lines = []
    for entity, mention in first_mentions.items():
        facts = knowledge.graph.facts(entity)
        if facts:
            name = entity if mention == entity else f"{mention}（{entity}）"
            lines.append(f"{name} → " + "；".join(f"{relation}: {tail}" for relation, tail in facts))
    return lines


class KnowledgePromptEncoder:
    """Drop-in for ``pipe.encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt)``."""

    def __init__(self, pipe, knowledge: Knowledge):
        self.tokenizer = pipe.tokenizer
        self.knowledge = knowledge
        text_encoder = pipe.text_encoder
        knowledge.injector.to(device=text_encoder.device, dtype=text_encoder.dtype)
        self.encoder = KnowledgeTextEncoder(text_encoder, knowledge.injector)

    def __call__(
        self,
        prompt: str | list[str],
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        **unused,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = self.encode_texts(prompts, device)
        negative = None
        if do_classifier_free_guidance:
            if negative_prompt is None:
                negatives = [""] * len(prompts)
            elif isinstance(negative_prompt, str):
                negatives = [negative_prompt] * len(prompts)
            else:
                negatives = list(negative_prompt)
            negative = self.encode_texts(negatives, device).repeat_interleave(num_images_per_prompt, dim=0)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0), negative

    def encode_texts(self, texts: list[str], device: torch.device) -> torch.Tensor:
        batch = self.knowledge.tokenize(self.tokenizer, texts)
        text_encoder = self.encoder.text_encoder
        use_mask = getattr(text_encoder.config, "use_attention_mask", False)
        mask = batch.attention_mask.to(device) if use_mask else None
        hidden = self.encoder(batch.input_ids.to(device), batch.entity_ids.to(device), attention_mask=mask)
        return hidden.to(dtype=text_encoder.dtype, device=device)

    def describe(self, prompt: str) -> list[str]:
        return describe_entities(self.knowledge, prompt)


def has_knowledge(model_folder: Path) -> bool:
    folder = Path(model_folder) / KNOWLEDGE_DIR
    return (folder / PROJECTION_FILE).is_file() and (folder / EMBEDDINGS_FILE).is_file()


def load_prompt_encoder(
    pipe, model_folder: Path, graph_path: Path | None, log: Callable[[str], None] = logger.info
) -> KnowledgePromptEncoder | None:
    """The knowledge encoder of a model folder, or None (plain encoder) if it has no knowledge weights."""
    if not has_knowledge(model_folder):
        log(f"{model_folder} has no {KNOWLEDGE_DIR}/ weights; the knowledge graph is not injected")
        return None
    knowledge = Knowledge.load(Path(model_folder) / KNOWLEDGE_DIR, graph_path)
    log(f"knowledge injection on: {len(knowledge.entity_rows)} entities, {len(knowledge.graph.triples)} triples")
    return KnowledgePromptEncoder(pipe, knowledge)
