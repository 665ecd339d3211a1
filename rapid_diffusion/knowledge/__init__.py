"""Knowledge-enhanced text encoding: entity linking, TransE, injection into the text encoder.

``graph`` reads a domain's knowledge graph, ``linking`` finds entity mentions in a prompt,
``transe`` trains and stores entity embeddings, ``injection`` adds them to the text encoder's input
embeddings. A room of its own: it imports nothing else of the package, so the registry, the
trainer and the demo tools can all use it. The knowledge-graph demo's evaluation and fine-tune
live in the dev package (``rapid_diffusion_dev.knowledge_demo``).
"""

from .graph import GraphError, KnowledgeGraph, Triple
from .injection import (
    KNOWLEDGE_DIR,
    NO_ENTITY,
    EntityInjector,
    Knowledge,
    KnowledgePromptEncoder,
    KnowledgeTextEncoder,
    TokenizedPrompts,
    describe_entities,
    has_knowledge,
    load_prompt_encoder,
)
from .linking import EntityLinker, EntitySpan, span_token_positions
from .transe import EntityEmbeddings, LinkPrediction, TransE, TransEConfig, evaluate_link_prediction, train_transe

__all__ = [
    "KNOWLEDGE_DIR",
    "NO_ENTITY",
    "EntityEmbeddings",
    "EntityInjector",
    "EntityLinker",
    "EntitySpan",
    "GraphError",
    "Knowledge",
    "KnowledgeGraph",
    "KnowledgePromptEncoder",
    "KnowledgeTextEncoder",
    "LinkPrediction",
    "TokenizedPrompts",
    "TransE",
    "TransEConfig",
    "Triple",
    "describe_entities",
    "evaluate_link_prediction",
    "has_knowledge",
    "load_prompt_encoder",
    "span_token_positions",
    "train_transe",
]
