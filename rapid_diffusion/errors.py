"""Exceptions shared by modules that must not import each other (the pipeline never imports the registry)."""

from __future__ import annotations


class ModelUnavailableError(RuntimeError):
    """A model cannot be used now: not cached and the hub is unreachable, a broken folder, or
    unloaded (evicted) between being looked up and being run. The service answers 503."""
