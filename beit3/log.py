"""The package's logging, in transformers' shape: ``get_logger(__name__)`` in each module, one library logger
(``beit3``) whose level ``set_verbosity`` (or ``BEIT3_VERBOSITY=debug|info|warning|error``) changes.

Progress and results (``info``) go to standard output as they are; warnings and errors go to standard error as
``warning: ...``. Both streams are looked up when a record is written, so redirecting ``sys.stdout`` or
``sys.stderr`` (pytest's capture, a notebook) takes effect. In a distributed run ``for_rank`` keeps rank 0's info
and every rank's warnings, the latter named by rank: a warning about a shard one rank reads is that rank's alone.
"""

from __future__ import annotations

import logging
import os
import sys

LIBRARY = "beit3"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Console(logging.Handler):
    """Info and below to the current ``sys.stdout``, warnings and above to the current ``sys.stderr``."""

    rank: int | None = None  # set by for_rank in a run of several processes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                where = f"[rank {self.rank}] " if self.rank is not None else ""
                stream, message = sys.stderr, f"{where}{record.levelname.lower()}: {message}"
            else:
                stream = sys.stdout
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            stream.write(message + "\n")
            stream.flush()
        except Exception:  # a closed stream must not end the run
            self.handleError(record)


_console = _Console()


def _level(name: str, where: str) -> int:
    if name.lower() not in _LEVELS:
        raise ValueError(f"{where}={name!r}: use one of {', '.join(_LEVELS)}.")
    return _LEVELS[name.lower()]


def _library_logger() -> logging.Logger:
    logger = logging.getLogger(LIBRARY)
    if _console not in logger.handlers:
        logger.addHandler(_console)
        logger.propagate = False  # the application's root handlers would print every line twice
        logger.setLevel(_level(os.environ.get("BEIT3_VERBOSITY", "info"), "BEIT3_VERBOSITY"))
    return logger


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``beit3.…``), below the library logger."""
    _library_logger()
    return logging.getLogger(name if name.startswith(LIBRARY) else f"{LIBRARY}.{name}")


def set_verbosity(level: int | str) -> None:
    """The library's level: ``logging.INFO`` (default), ``"warning"`` (results and progress silenced), ..."""
    _library_logger().setLevel(_level(level, "set_verbosity") if isinstance(level, str) else level)


def for_rank(rank: int, world_size: int) -> None:
    """A process of a distributed run: info from rank 0 only; warnings from all, named by rank."""
    if world_size > 1:
        _console.rank = rank
        if rank != 0 and "BEIT3_VERBOSITY" not in os.environ:
            _library_logger().setLevel(logging.WARNING)
