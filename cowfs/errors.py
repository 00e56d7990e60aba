"""The one exception type every command turns into a single clear error line."""

from __future__ import annotations


class CowfsError(Exception):
    """A user-facing failure: the message is printed as one line, exit status 1."""


class StoreError(CowfsError):
    """The object store refused an operation (corruption, collision, not writable)."""


class CollisionError(StoreError):
    """Two different contents hashed to the same digest: never deduplicated."""
