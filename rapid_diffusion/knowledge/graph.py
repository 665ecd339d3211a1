"""A domain's knowledge graph: ``head<TAB>relation<TAB>tail`` triples plus entity aliases.

On disk a graph is a folder holding ``triples.tsv`` and, optionally, ``entities.tsv``
(``entity<TAB>alias1,alias2``: the surface forms entity linking also matches), or a single
triples file (an ``entities.tsv`` beside it is read too). Lines starting with ``#`` and
blank lines are ignored. Every entity named in a triple or in ``entities.tsv`` is an entity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

TRIPLES_FILE = "triples.tsv"
ENTITIES_FILE = "entities.tsv"
_ALIAS_SEPARATORS = re.compile(r"[,，、]")


class GraphError(ValueError):
    """A graph file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Triple:
    head: str
    relation: str
    tail: str


@dataclass
class KnowledgeGraph:
    triples: list[Triple]
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self):
        names = list(self.aliases)
        for t in self.triples:
            names += [t.head, t.tail]
        self.entities: list[str] = list(dict.fromkeys(names))
        self.relations: list[str] = list(dict.fromkeys(t.relation for t in self.triples))
        self.entity_index = {e: i for i, e in enumerate(self.entities)}
        self.relation_index = {r: i for i, r in enumerate(self.relations)}

    def surface_forms(self) -> dict[str, str]:
        """Every string that names an entity (its name and aliases) -> the entity."""
        forms = {e: e for e in self.entities}
        for entity, aliases in self.aliases.items():
            for alias in aliases:
                forms.setdefault(alias, entity)
        return forms

    def facts(self, entity: str) -> list[tuple[str, str]]:
        """What the graph says of ``entity`` as a head: ``(relation, tail)`` pairs, file order."""
        return [(t.relation, t.tail) for t in self.triples if t.head == entity]

    def index_triples(self) -> list[tuple[int, int, int]]:
        return [(self.entity_index[t.head], self.relation_index[t.relation], self.entity_index[t.tail]) for t in self.triples]

    @classmethod
    def load(cls, path: Path) -> "KnowledgeGraph":
        path = Path(path)
        triples_file = path / TRIPLES_FILE if path.is_dir() else path
        if not triples_file.is_file():
            raise GraphError(f"{triples_file}: no triples file")
        aliases_file = triples_file.parent / ENTITIES_FILE
        aliases = read_aliases(aliases_file) if aliases_file.is_file() else {}
        return cls(read_triples(triples_file), aliases)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        rows = [f"{t.head}\t{t.relation}\t{t.tail}" for t in self.triples]
        (folder / TRIPLES_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
        rows = [f"{e}\t{','.join(a)}" for e, a in self.aliases.items()]
        (folder / ENTITIES_FILE).write_text("\n".join(rows) + "\n", encoding="utf-8")
        return folder


def _data_lines(path: Path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line.rstrip("\r")


def read_triples(path: Path) -> list[Triple]:
    triples = []
    for number, line in _data_lines(path):
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) != 3 or not all(parts):
            raise GraphError(f"{path}:{number}: expected 'head<TAB>relation<TAB>tail', got {line!r}")
        triples.append(Triple(*parts))
    return triples


def read_aliases(path: Path) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for number, line in _data_lines(path):
        entity, _, rest = line.partition("\t")
        if not entity.strip():
            raise GraphError(f"{path}:{number}: expected 'entity<TAB>alias1,alias2', got {line!r}")
        names = tuple(a.strip() for a in _ALIAS_SEPARATORS.split(rest) if a.strip())
        aliases[entity.strip()] = aliases.get(entity.strip(), ()) + names
    return aliases
