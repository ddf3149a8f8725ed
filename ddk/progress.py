"""What the training loop needs besides the model: a stop request on SIGINT/SIGTERM, and the
throughput of the steps since the last log."""

from __future__ import annotations

import contextlib
import signal
import time


class StopRequest:
    """SIGINT/SIGTERM (e.g. cluster preemption) ask the loop to save and exit at a step boundary."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Throughput:
    """Tokens per second over the steps since the last log."""

    def __init__(self):
        self.reset()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def reset(self) -> None:
        self.tokens, self.started = 0, time.perf_counter()
