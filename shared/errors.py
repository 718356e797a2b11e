"""The error taxonomy with one policy: poison is dead-lettered, transient retried, fatal crashes."""

from __future__ import annotations


class BeeldportaalError(Exception):
    """Base of the project's own errors."""


class PoisonEvent(BeeldportaalError):
    """Can never succeed however often it is retried: dead-letter it with this reason."""


class TransientError(BeeldportaalError):
    """May succeed later (a peer or the platform is down): retry with backoff."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalError(BeeldportaalError):
    """The process cannot go on (misconfiguration, broken invariant): crash and be restarted."""
