"""Riding out an object store that does not answer (a restart, a failover, a network blip).

The SDKs retry each request for a few seconds (``storage.S3_MAX_ATTEMPTS``). An unreachable
store — connection refused, connect or read timeout — is then retried here with a wall-clock
budget instead of an attempt count, so how long an outage is ridden out does not depend on
jitter or on how many requests were in flight. The budget is per process and shared by its
threads: once the store has been away for ``S3_OUTAGE_SECONDS`` every request fails after the
SDK's own tries, and the job fails in bounded time (``StoreUnavailable``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
S3_OUTAGE_SECONDS = 60.0
MAX_PAUSE_SECONDS = 5.0
# how the AWS SDK (pyarrow) words "no answer from the endpoint"; botocore raises its own types
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "Could not connect",
    "Connection refused",
    "Couldn't resolve host",
    "Timeout was reached",
)


class StoreUnavailable(ConnectionError):
    """The object store did not answer for S3_OUTAGE_SECONDS: a job-level failure, not a bad study."""

    error_type = "StoreUnavailable"


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store did not answer (not: it answered with an error)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, BotoConnectionError | HTTPClientError) or any(s in str(exc) for s in _UNREACHABLE)


class Outage:
    """Since when this process has had no answer from the store."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.last = 0.0

    def failed(self, started: float) -> float:
        """Record a request (started at ``started``) that got no answer; seconds away so far."""
        with self.lock:
            now = time.monotonic()
            # a record older than the budget, with no request in between, is another outage
            if self.since is None or started - self.last > S3_OUTAGE_SECONDS:
                self.since = started
            self.last = now
            return now - self.since

    def answered(self) -> None:
        if self.since is not None:
            with self.lock:
                self.since = None


OUTAGE = Outage()


def ride_out(request: Callable[[], T], give_up: Callable[[BaseException, float], StoreUnavailable]) -> T:
    """``request()``, repeated while the store does not answer, until it has been away for
    S3_OUTAGE_SECONDS; then ``give_up(last error, seconds away)`` is raised."""
    pause = 0.5
    while True:
        started = time.monotonic()
        try:
            result = request()
        except Exception as exc:
            if not unreachable(exc):
                raise
            away = OUTAGE.failed(started)
            if away >= S3_OUTAGE_SECONDS:
                raise give_up(exc, away) from None
            time.sleep(min(pause, S3_OUTAGE_SECONDS - away))
            pause = min(2 * pause, MAX_PAUSE_SECONDS)
        else:
            OUTAGE.answered()
            return result
