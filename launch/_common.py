"""Shared start-up for the absl launchers: argument / config checks and logging."""
from __future__ import annotations

import logging
from typing import Any

from absl import app


def checked_config(argv: list[str], config: Any) -> Any:
    """The parsed --config, or a UsageError for stray arguments / a missing config."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    return config


def setup_logging() -> None:
    """INFO for the project, WARNING for absl (orbax logs every save step at INFO)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
