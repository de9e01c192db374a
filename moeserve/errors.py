"""Errors that cross the boundary between the front and the engine; no heavy imports, so the
front can catch them without loading the model's modules."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory moeserve cannot load exactly; the message names the problem."""


class RequestFailedError(RuntimeError):
    """The engine failed this request (and only this request)."""


class EngineDeadError(RuntimeError):
    """The engine has stopped; nothing can be served until the server restarts."""


class EngineStartError(RuntimeError):
    """The engine could not start (bad checkpoint, no memory, ...); the message says why."""
