"""The models a multi-model worker holds: states, in-flight counts, LRU order and the memory budget.

Every model is charged bytes against one budget. A load first reserves its name (a second load of
the
same name is a 409), then asks for room for its estimated charge: when the loaded models leave too
little, an explicit load is refused (507, as SageMaker expects, so the platform unloads and
retries),
while a load on first use evicts the least recently used idle models until it fits (507 when even
that is not enough). Once loaded, the charge becomes what the model really holds, if larger. A model
being unloaded takes no new requests (404) and goes only when its in-flight requests are done.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import RequestError

__all__ = ["LOADING", "READY", "UNLOADING", "LoadedModel", "ModelRegistry"]

LOADING, READY, UNLOADING = "loading", "ready", "unloading"


@dataclass(eq=False)
class LoadedModel:
    """One model and its bookkeeping; mutable fields change only under the registry's lock."""

    name: str
    url: str
    path: Path | None = None
    serving: Any = None  # the model's own Serving (handler and runner)
    invoke: Any = None  # its request path: environ -> (status, body, Content-Type, close)
    charge: int = 0
    state: str = LOADING
    inflight: int = 0
    loaded_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)


class ModelRegistry:
    """Thread-safe map of model name -> LoadedModel under ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._cond = threading.Condition()
        self._models: dict[str, LoadedModel] = {}
        self.loads = {"ok": 0, "failed": 0, "refused": 0}
        self.unloads = {"request": 0, "evicted": 0}

    # --- loading -------------------------------------------------------------------------------
    def reserve(self, name: str, url: str) -> LoadedModel:
        """Claim ``name`` for a load; 409 when it is loaded or loading."""
        with self._cond:
            if name in self._models:
                state = self._models[name].state
                raise RequestError(
                    409,
                    f"model {name!r} is already {state}; unload it first (DELETE /models/{name})",
                )
            entry = LoadedModel(name, url)
            self._models[name] = entry
            return entry

    def make_room(
        self, entry: LoadedModel, estimate: int, *, evict: bool, available: int | None = None
    ) -> list[LoadedModel]:
        """Charge ``estimate`` bytes to ``entry``; the models to unload for it (evict only); 507
        when it cannot fit.

        ``available`` is the memory the system has free now: a model larger than that cannot load
        either.
        """
        with self._cond:
            used = sum(m.charge for m in self._models.values() if m is not entry)
            victims: list[LoadedModel] = []
            if used + estimate > self.budget and evict:
                idle = sorted(
                    (
                        m
                        for m in self._models.values()
                        if m is not entry and m.state == READY and m.inflight == 0
                    ),
                    key=lambda m: m.last_used,
                )
                freed = 0
                for model in idle:
                    if used - freed + estimate <= self.budget:
                        break
                    victims.append(model)
                    freed += model.charge
                if used - freed + estimate > self.budget:
                    victims = []
                else:
                    used -= freed
            if used + estimate > self.budget:
                self.loads["refused"] += 1
                raise RequestError(
                    507,
                    f"model {entry.name!r} needs about {estimate} bytes but {used} of the "
                    f"{self.budget}-byte budget are taken; unload a model or raise "
                    "TORCHBAY_MME_MEMORY_MB",
                )
            if available is not None and not victims and estimate > available:
                self.loads["refused"] += 1
                raise RequestError(
                    507,
                    f"model {entry.name!r} needs about {estimate} bytes but the system has "
                    f"{available} free; unload a model",
                )
            for model in victims:
                model.state = UNLOADING
            entry.charge = estimate
            return victims

    def loaded(
        self, entry: LoadedModel, *, path: Path, serving: Any, invoke: Any, charge: int
    ) -> None:
        with self._cond:
            entry.path, entry.serving, entry.invoke = path, serving, invoke
            entry.charge = max(entry.charge, charge)
            entry.state, entry.loaded_at, entry.last_used = READY, time.time(), time.monotonic()
            self.loads["ok"] += 1
            self._cond.notify_all()

    def failed(self, entry: LoadedModel) -> None:
        with self._cond:
            if self._models.get(entry.name) is entry:
                del self._models[entry.name]
            self.loads["failed"] += 1
            self._cond.notify_all()

    # --- requests ------------------------------------------------------------------------------
    def acquire(self, name: str, wait: float) -> LoadedModel | None:
        """The ready model (its in-flight count raised), waiting up to ``wait`` s while it loads;
        None otherwise."""
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                entry = self._models.get(name)
                if entry is None or entry.state == UNLOADING:
                    return None
                if entry.state == READY:
                    entry.inflight += 1
                    entry.last_used = time.monotonic()
                    return entry
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def release(self, entry: LoadedModel) -> None:
        with self._cond:
            entry.inflight -= 1
            entry.last_used = time.monotonic()
            self._cond.notify_all()

    # --- unloading -----------------------------------------------------------------------------
    def begin_unload(self, name: str) -> LoadedModel:
        """Stop taking requests for ``name``; 404 when it is not loaded, 409 while it is still
        loading."""
        with self._cond:
            entry = self._models.get(name)
            if entry is None or entry.state == UNLOADING:
                raise RequestError(
                    404, f"model {name!r} is not loaded; GET /models lists the loaded ones"
                )
            if entry.state == LOADING:
                raise RequestError(
                    409, f"model {name!r} is still loading; unload it when the load has finished"
                )
            entry.state = UNLOADING
            return entry

    def finish_unload(self, entry: LoadedModel, timeout: float, *, reason: str = "request") -> int:
        """Wait (up to ``timeout`` s) for the model's in-flight requests, then forget it; those
        still running."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while entry.inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._models.get(entry.name) is entry:
                del self._models[entry.name]
            self.unloads[reason] += 1
            self._cond.notify_all()
            return entry.inflight

    # --- views ---------------------------------------------------------------------------------
    def get(self, name: str) -> LoadedModel | None:
        with self._cond:
            return self._models.get(name)

    def models(self) -> list[LoadedModel]:
        """Every model known (loading, ready or unloading), by name."""
        with self._cond:
            return sorted(self._models.values(), key=lambda m: m.name)

    def used(self) -> int:
        with self._cond:
            return sum(m.charge for m in self._models.values())
