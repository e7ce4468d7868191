"""The ChatCore in force in a worker, and its swap on a config reload.

Everything built from a Config (routing, deployments, fallbacks, keys, limits, prices, the ledger)
lives in one ChatCore; a reload builds a whole new one and points the transports at it in one step
of the event loop. A call holds the core it started on, so calls in flight finish on the old config.
The old core is closed once its last call has ended. Providers whose settings did not change move
to the new core with their connection pools; the old core closes the others.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.config import Config
from gateway.logs import get_logger

from .chat import ChatCore
from .providers import Provider, build_provider
from .router import Router
from .tenancy import Tenancy

log = get_logger("reload")

# How often a replaced core is checked for calls still running; only while one is being retired.
_IDLE_POLL = 0.1


class Transport(Protocol):
    def swap(self, core: ChatCore) -> None: ...


def successor(old: ChatCore, config: Config) -> tuple[ChatCore, set[str]]:
    """A core for `config`, sharing the old one's providers whose settings did not change (their
    names are returned)."""
    before, specs = old.router.providers, old.config.providers
    kept = {name for name, spec in config.providers.items() if name in before and specs.get(name) == spec}
    built: dict[str, Provider] = {}
    try:
        providers = {
            name: before[name] if name in kept else built.setdefault(name, build_provider(spec))
            for name, spec in config.providers.items()
        }
        core = ChatCore(config, Router(config, providers))
        core.router.inherit(old.router, kept)  # nor are the deployments' cooldowns
        Tenancy.carry_over(old.tenancy, core.tenancy)  # limits and slots are not reset by a reload
        return core, kept
    except BaseException:
        for provider in built.values():
            asyncio.get_running_loop().create_task(provider.close())
        raise


class LiveCore:
    def __init__(self, core: ChatCore, transports: list[Transport]) -> None:
        self.core = core
        self._transports = transports
        self._retiring: set[asyncio.Task[None]] = set()

    def swap(self, config: Config) -> bool:
        """Put a core for `config` in force; False (and the old one kept) if it cannot be built."""
        old = self.core
        try:
            new, kept = successor(old, config)
        except Exception:
            log.error("cannot build the new config; the old one keeps serving", exc_info=True)
            return False
        old.router.hand_over(kept)
        self.core = new
        for transport in self._transports:
            transport.swap(new)
        task = asyncio.get_running_loop().create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return True

    async def _retire(self, core: ChatCore) -> None:
        try:
            # Polled: a core has no event for its last call, and this runs only while one is retired.
            while core.in_flight or core._draining:  # noqa: ASYNC110 - _draining: streams their clients left
                await asyncio.sleep(_IDLE_POLL)
        finally:  # cancelled at shutdown: closed at once
            await core.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.core.close()
