"""`Deadline` behaves as `asyncio.timeout_at` does, block by block, on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from service.deadline import Deadline


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_block_that_runs_past_the_deadline_raises_timeout_error() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with Deadline(loop.time() + 0.02, loop):
                await asyncio.sleep(5)
        # The task is usable afterwards: the deadline's cancel was withdrawn.
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        await asyncio.sleep(0)

    _run(main())


def test_blocks_inside_the_deadline_finish_and_later_blocks_share_it() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop.time() + 0.2, loop)
        for _ in range(3):  # one block per read, as a stream uses it
            async with deadline:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.25)  # outside any block the deadline passing does nothing
        with pytest.raises(TimeoutError):
            async with deadline:  # already past: the next block fails at its first await
                await asyncio.sleep(5)

    _run(main())


def test_a_deadline_already_past_fails_the_block() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with Deadline(loop.time() - 1, loop):
                await asyncio.sleep(1)

    _run(main())


def test_someone_elses_cancel_stays_a_cancel() -> None:
    async def guarded(deadline: Deadline) -> None:
        async with deadline:
            await asyncio.sleep(5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(guarded(Deadline(loop.time() + 5, loop)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(main())


def test_an_outer_cancel_that_coincides_with_the_deadline_wins() -> None:
    """Both fire: the block must not swallow the outer cancel as its own timeout."""

    async def guarded(deadline: Deadline, started: asyncio.Event) -> None:
        async with deadline:
            started.set()
            await asyncio.sleep(5)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        deadline = Deadline(loop.time() + 0.05, loop)
        task = loop.create_task(guarded(deadline, started))
        await started.wait()
        loop.call_at(deadline.when, task.cancel)  # scheduled after the deadline's own timer
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(main())


def test_blocks_of_one_deadline_may_run_in_different_tasks() -> None:
    async def wait_in_block(deadline: Deadline, seconds: float) -> None:
        async with deadline:
            await asyncio.sleep(seconds)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop.time() + 0.1, loop)
        await loop.create_task(wait_in_block(deadline, 0.01))
        with pytest.raises(TimeoutError):
            await loop.create_task(wait_in_block(deadline, 5))

    _run(main())


def test_outside_a_task_is_an_error() -> None:
    loop = asyncio.new_event_loop()
    try:
        deadline = Deadline(loop.time() + 1, loop)
        with pytest.raises(RuntimeError):
            loop.run_until_complete(_enter_from_a_plain_coroutine(deadline, loop))
    finally:
        loop.close()


async def _enter_from_a_plain_coroutine(deadline: Deadline, loop: asyncio.AbstractEventLoop) -> None:
    # run_until_complete wraps the coroutine in a task, so look the deadline up from a callback instead.
    future: asyncio.Future[None] = loop.create_future()

    def enter() -> None:
        coro = deadline.__aenter__()
        try:
            coro.send(None)
        except RuntimeError as exc:
            future.set_exception(exc)
        except StopIteration:
            future.set_result(None)

    loop.call_soon(enter)
    await future
