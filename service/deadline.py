"""A deadline for blocks of awaits, the hot-path twin of `asyncio.timeout_at`.

`asyncio.timeout_at` looks up the running loop and the current task each time a block is entered,
and on Python 3.11 every such lookup is a getpid() system call: three per block, and a stream enters
one block per upstream read. A `Deadline` is made once per request with the loop in hand; entering
a block costs one timer. The cancellation bookkeeping is asyncio's own: the task is cancelled when the
time passes, and the block turns that cancellation (and only that one) into TimeoutError.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Deadline:
    """`async with deadline:` raises TimeoutError if loop time `when` passes inside the block. One
    object may guard many blocks in turn (one per read), from whichever task runs each."""

    __slots__ = ("_cancelling", "_expired", "_handle", "_task", "loop", "when")

    def __init__(self, when: float, loop: asyncio.AbstractEventLoop) -> None:
        self.when = when
        self.loop = loop
        self._expired = False

    async def __aenter__(self) -> Deadline:
        self.enter()
        return self

    def enter(self) -> None:
        """Start a block by hand: `enter()`, the awaits, then `leave(exc)` however they ended. The hot
        paths use this pair instead of `async with`, whose __aenter__/__aexit__ are two coroutines a block."""
        task = asyncio.current_task(self.loop)  # given the loop: no lookup of the running one
        if task is None:
            raise RuntimeError("a Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()  # cancellations requested before us are not ours to absorb
        self._expired = False
        self._handle = self.loop.call_at(self.when, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.leave(exc)

    def leave(self, exc: BaseException | None) -> None:
        """End the block `enter()` began; `exc` is what the block raised (None if nothing). Raises
        TimeoutError (from `exc`) when the block's CancelledError was this deadline's."""
        self._handle.cancel()
        # As asyncio.Timeout: our cancel is withdrawn; if nobody else cancelled the task meanwhile,
        # the CancelledError it caused becomes a TimeoutError.
        if self._expired and self._task.uncancel() <= self._cancelling and type(exc) is asyncio.CancelledError:
            raise TimeoutError from exc
