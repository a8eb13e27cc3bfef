"""Shared start-up for the absl launchers: argument / config checks, logging, one-line user errors.

``run_cli(main)`` replaces ``app.run(main)``: a bad flag or ``--config`` override, a missing
config file and every user error raised by ``main`` (bad request or data record, missing file,
config value, unusable model, refused batch) end the program with ONE line ``error: ...`` on
stderr (naming the record and field where there is one) and exit status 2 — no traceback.
Programming errors keep their traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, NoReturn

from absl import app, flags

EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "fix your input", not "fix the code"."""
    from metake_jax.data.loaders import DataUnavailableError
    from metake_jax.errors import EditError, RequestError, StatsMissingError
    from metake_jax.runner import RunError
    from metake_jax.stats import CorpusError
    from models.hf_layout import ConversionError

    return (RunError, RequestError, DataUnavailableError, StatsMissingError, ConversionError, CorpusError,
            EditError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _join_lines(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def one_line(e: BaseException) -> str:
    """The exception's message on one line (line breaks joined; spaces inside a line kept)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)  # KeyError: repr of its key
    return _join_lines(text) or type(e).__name__


def fail(message: str) -> NoReturn:
    """Print ``error: <message>`` (one line) to stderr and exit with status 2."""
    print(f"error: {_join_lines(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except SystemExit as e:  # absl exits 1 after printing the usage a help flag asked for: that is a success
        if e.code == 1 and any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
    except flags.Error as e:
        fail(f"bad flag: {one_line(e)}")
    except (KeyError, AttributeError) as e:  # --config.<field> with no such field
        bad = [a.split("=", 1)[0].lstrip("-") for a in argv if a.startswith("--config.")]
        name = str(e.args[0] if e.args else e).strip("'\"")
        field = next((b for b in bad if b.split(".")[-1] == name), name)
        hint = ""
        if field.startswith("config.editor.") and field.count(".") == 2:
            hint = " (editor hyper-parameters are per editor: config.editor.<name>.<field>, e.g. config.editor.alphaedit.l2)"
        fail(f"bad --config override: unknown field {field}{hint}")
    except (ValueError, TypeError) as e:  # a --config.<field> value that does not fit the field
        fail(f"bad --config override: {one_line(e)}")
    except (OSError, SyntaxError, ImportError) as e:  # overrides on a config file that did not load
        fail(f"--config: {one_line(e)}")


def run_cli(main: Callable[[list[str]], Any]) -> None:
    """``app.run(main)`` with one-line errors for bad flags and for every ``user_errors()`` type."""

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except user_errors() as e:
            fail(one_line(e))

    app.run(guarded, flags_parser=_parse_flags)


def checked_config(argv: list[str], config: Any) -> Any:
    """The parsed --config; one-line error for stray arguments, a missing or unloadable config."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    if config is None:
        fail("--config=configs/<name>.py is required")
    try:
        config.keys()  # a config file that failed to load raises here, not at parse time
    except (OSError, SyntaxError, ImportError, AttributeError, KeyError, ValueError, TypeError) as e:
        fail(f"--config: {one_line(e)}")
    return config


def setup_logging() -> None:
    """INFO for the project, WARNING for absl (orbax logs every save step at INFO)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
