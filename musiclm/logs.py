"""One logging setup for the library: modules log through :func:`get_logger`; command-line entry
points (``musiclm``, ``ray_jobs/*.py``) call :func:`setup_logging` once. ``print`` is left for what
a command outputs (JSON results, summaries), so stdout stays machine-readable.

``MUSICLM_LOG_LEVEL`` (e.g. ``DEBUG``) overrides the level an entry point asks for.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["get_logger", "setup_logging"]

ROOT = "musiclm"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class MusiclmHandler(logging.StreamHandler):
    """The handler :func:`setup_logging` installs (recognised on a second call)."""


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (pass ``__name__``); names outside ``musiclm.`` (``ray_jobs.*``) are
    kept as they are."""
    return logging.getLogger(name)


def setup_logging(level: int | str = "INFO", *, stream=None) -> None:
    """Log records of ``musiclm.*`` and ``ray_jobs.*`` at ``level`` and above to ``stream`` (stderr)
    with a timestamp. Idempotent: a second call only changes the level."""
    level = os.environ.get("MUSICLM_LOG_LEVEL") or level
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    for name in (ROOT, "ray_jobs"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, MusiclmHandler) for h in logger.handlers):
            handler = MusiclmHandler(stream or sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
            logger.addHandler(handler)
