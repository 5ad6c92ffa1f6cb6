"""structlog set-up (JSON lines under systemd, a readable console on a terminal) and rate-limited logging.

Configured once at start by the CLI; `set_level` applies a reloaded `log.level`. When stdout is journald's
(systemd sets ``JOURNAL_STREAM``), each line starts with its syslog priority (``<4>`` for a warning, ...),
which journald strips and records (``SyslogLevelPrefix=`` is on by default), so ``journalctl -p warning``
works.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_state: dict[str, Any] = {"format": "auto", "stream": None}
# syslog priorities (RFC 5424) of structlog's level names
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


def _under_journald(out: TextIO) -> bool:
    """systemd connected stdout to the journal: JOURNAL_STREAM is "device:inode" of that very stream."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return dev.isdigit() and ino.isdigit() and (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _syslog_prefix(_logger: Any, method: str, event: Any) -> Any:
    """Last processor: prefix the rendered line with ``<priority>`` for journald."""
    return f"<{SYSLOG_PRIORITY.get(method, 6)}>{event}"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog for the whole process: JSON when not on a TTY (journald), console otherwise."""
    out = stream if stream is not None else sys.stdout
    _state.update(format=fmt, stream=out)
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    tail = [_syslog_prefix] if _under_journald(out) else []
    structlog.configure(
        processors=[*processors, renderer, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def set_level(level: str) -> None:
    configure(level, _state["format"], _state["stream"])


class QuietLog:
    """Logs an event at most once per (key) per interval; counts what it suppressed.

    Content an attacker controls (rejected messages) goes through this, so a flood cannot flood the journal.
    Bounded: at most ``max_keys`` keys are remembered.
    """

    def __init__(self, interval_s: float = 60.0, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: OrderedDict[tuple[str, ...], tuple[float, int]] = OrderedDict()

    def should_log(self, key: tuple[str, ...], now: float | None = None) -> tuple[bool, int]:
        """(log it?, how many were suppressed since the last logged one)."""
        t = time.monotonic() if now is None else now
        prev = self._last.get(key)
        if prev is not None and t - prev[0] < self.interval_s:
            self._last[key] = (prev[0], prev[1] + 1)
            return False, 0
        suppressed = prev[1] if prev else 0
        self._last[key] = (t, 0)
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True, suppressed
