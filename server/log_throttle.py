"""ThrottleFilter: at most one log line per kind of record per interval, with a count of the ones it held back.

Some records repeat once per connection: asyncio logs a full traceback for every failed `accept()` once the process
is out of file descriptors (thousands a second, megabytes of log a second), and the connection guards
(`server.http_protocol`) report every timed-out or refused connection. A record that the filter's `key` function
maps to a key passes at most once per `interval` seconds per key; the next one that passes says how many were
suppressed since. Records mapped to None always pass.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Hashable

ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
INTERVAL_S = 10.0


class ThrottleFilter(logging.Filter):
    def __init__(self, key: Callable[[logging.LogRecord], Hashable | None], interval: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if interval <= 0:
            raise ValueError(f"ThrottleFilter: interval must be > 0, got {interval!r}")
        self.key = key
        self.interval = interval
        self.clock = clock
        self.suppressed_total = 0
        self._next_pass: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = self.key(record)
        if key is None:
            return True
        now = self.clock()
        if now < self._next_pass.get(key, now):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            self.suppressed_total += 1
            return False
        self._next_pass[key] = now + self.interval
        held = self._suppressed.pop(key, 0)
        if held:
            # getMessage() applies the args, so the note is appended to the final text and the args are dropped
            record.msg = f"{record.getMessage()} [{held} similar message(s) suppressed in the last " \
                         f"{self.interval:g}s]"
            record.args = None
        return True


def accept_error_key(record: logging.LogRecord) -> Hashable | None:
    """asyncio's "socket.accept() out of system resource" (EMFILE, ENFILE, ENOBUFS, ENOMEM), keyed by errno."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS:
        return ("accept", exc.errno)
    if isinstance(record.msg, str) and record.msg.startswith("socket.accept()"):
        return ("accept", None)
    return None


def template_key(record: logging.LogRecord) -> Hashable:
    """Every record of a logger, keyed by its format string (not the formatted text, which names the client)."""
    return record.msg


def install(logger_name: str, key: Callable[[logging.LogRecord], Hashable | None],
            interval: float = INTERVAL_S) -> ThrottleFilter:
    """Attach a ThrottleFilter to a logger once (idempotent per logger); returns the one attached."""
    logger = logging.getLogger(logger_name)
    for existing in logger.filters:
        if isinstance(existing, ThrottleFilter):
            return existing
    throttle = ThrottleFilter(key, interval)
    logger.addFilter(throttle)
    return throttle
