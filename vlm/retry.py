"""A proposer that retries: many ranks, or one impatient user, against one VLM server."""
import dataclasses
import random
import re
import threading
import time

from vlm.base import Reply

# The VLM client's messages for faults that may pass: no connection, a timeout, a slow name lookup, HTTP 408, 429, 5xx.
TRANSIENT = re.compile(r"^(?:HTTP (?:5\d\d|408|429)\b|cannot reach |no (?:complete )?answer |connection to "
                       r"|name lookup )")


class RetryingProposer:
    """Wraps a proposer (vlm/client.py's VLMClient, or any other): at most `max_in_flight` calls
    run at once in this process, and a call whose reply is a transient fault (see TRANSIENT) is
    tried again, up to `retries` more times, after exponential backoff with jitter:
    backoff · 2^attempt · U(0.5, 1.5) seconds, at most `max_backoff`. Other faults (a malformed
    or empty reply, HTTP 4xx) are returned at once. Each attempt has the inner proposer's own
    timeout, so one query takes at most (retries + 1) timeouts plus the backoff.

    With torchrun, every rank has its own, so one server sees at most world_size · max_in_flight
    requests at once. `longest()` bounds one query's wall time, for an inner proposer with a `timeout`."""

    def __init__(self, proposer, retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_in_flight: int = 4, sleep=time.sleep):
        if retries < 0 or backoff < 0 or max_in_flight < 1:
            raise ValueError("retries and backoff must be 0 or more, max_in_flight at least 1")
        self.proposer, self.retries, self.backoff, self.max_backoff = proposer, retries, backoff, max_backoff
        self.max_in_flight, self._slots, self._sleep = max_in_flight, threading.BoundedSemaphore(max_in_flight), sleep
        self.needs_image = getattr(proposer, "needs_image", True)

    def __repr__(self):
        return f"RetryingProposer({self.proposer!r}, retries={self.retries}, max_in_flight={self.max_in_flight})"

    def longest(self) -> float | None:
        """The longest one query can take: each attempt at most the inner proposer's `timeout`, plus the backoff."""
        timeout = getattr(self.proposer, "timeout", None)
        return None if timeout is None else (self.retries + 1) * timeout + self.retries * self.max_backoff

    def __call__(self, image, prompt: str, step: int) -> Reply:
        start = time.perf_counter()
        for attempt in range(self.retries + 1):
            with self._slots:
                reply = self.proposer(image, prompt, step)
            if reply.error is None or attempt == self.retries or not TRANSIENT.match(reply.error):
                break
            self._sleep(min(self.max_backoff, self.backoff * 2 ** attempt * random.uniform(0.5, 1.5)))
        if reply.error is not None and attempt > 0:
            reply = dataclasses.replace(reply, error=f"{reply.error} (after {attempt + 1} attempts)")
        return dataclasses.replace(reply, latency=time.perf_counter() - start)
