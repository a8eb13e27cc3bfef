"""Error types shared across metake_jax (kept minimal; other modules import these names)."""
from __future__ import annotations


class RunError(RuntimeError):
    """The run cannot go on (bad config, failed batch, inconsistent checkpoint); says why."""


class ConfigError(RunError):
    """A run configuration field is unknown, of the wrong type or not allowed; the message names it
    (``config.<section>.<field>``)."""


class EditError(RuntimeError):
    """An edit cannot be written (e.g. a non-finite increment); the message names the layer."""


class IllConditionedError(EditError):
    """A closed-form solve (docs/FORMULAS.md §4) is numerically unreliable; the message names the layer."""


class StatsMissingError(FileNotFoundError):
    """Layer statistics C0 (docs/FORMULAS.md §4) are not cached and computing them was not allowed."""


class RequestError(ValueError):
    """A bad edit request; names the record (``case_id``) and the offending ``field``."""

    def __init__(self, message: str, *, case_id: object = None, field: str | None = None) -> None:
        self.case_id = case_id
        self.field = field
        where = []
        if case_id is not None:
            where.append(f"case_id={case_id!r}")
        if field is not None:
            where.append(f"field={field!r}")
        prefix = f"request {' '.join(where)}: " if where else ""
        super().__init__(prefix + message)
