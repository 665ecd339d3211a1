"""Exceptions shared by modules that must not import each other (the pipeline never imports the registry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ModelUnavailableError(RuntimeError):
    """A model cannot be used now: not cached and the hub is unreachable, a broken folder, or
    unloaded (evicted) between being looked up and being run. The service answers 503."""


@dataclass
class UserFacingError(Exception):
    """What a user is told: an HTTP status, the request field at fault (if any), a sentence.

    Raised by the service (``service.app``, ``service.models``); each face turns it into its own form."""

    status: int
    message: str
    field: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}
