"""The gunicorn launcher: this process becomes the master, the workers fork from it.

With preload (the default on CPU) the model was loaded here before the fork, so its weights
are shared copy-on-write by every worker. The master tracks which workers booted and which
died unexpectedly (``/ping`` reads it); SIGTERM drains in-flight requests and stops every
worker within the grace period.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from agent.serving.app import Serving
from agent.serving.config import assign_gpu
from agent.serving.shared import SharedState

__all__ = ["run_server", "gunicorn_options", "balanced_worker"]


def balanced_worker(state: SharedState) -> type:
    """gunicorn's gthread worker that accepts a connection only while it holds no more than the fewest
    any other worker holds, so keep-alive clients spread evenly over the workers.

    Without it one worker can take most of a burst of connections (28 of 32 seen with 2 workers) while
    the other idles between its few clients' requests. Counts go through ``state``; a worker that is
    alone, or whose siblings are not ready, accepts as gunicorn would.
    """
    from gunicorn.workers.gthread import ThreadWorker

    class BalancedWorker(ThreadWorker):
        _slot: Optional[int] = None
        _limit = 1000

        @property  # type: ignore[override]
        def worker_connections(self) -> int:  # read by gunicorn's loop before each wait for events
            if self._slot is None:
                self._slot = state.worker_slot(os.getpid())
            if self._slot is None:
                return self._limit
            state.set_connections(self._slot, self.nr_conns)
            fewest = state.fewest_connections(self._slot)
            return self._limit if fewest is None else min(self._limit, fewest + 1)

        @worker_connections.setter
        def worker_connections(self, value: int) -> None:
            self._limit = value

    return BalancedWorker


def gunicorn_options(serving: Serving) -> dict[str, Any]:
    """The gunicorn settings for a ServeConfig."""
    config = serving.config
    return {
        "bind": [f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"],
        "workers": config.workers,
        "worker_class": balanced_worker(serving.state),
        "threads": config.http_threads,
        "timeout": max(30, int(config.timeout) + 30),  # heartbeat only: slow requests are answered 504 first
        "graceful_timeout": max(1, int(round(config.grace_period))),
        "keepalive": 5,
        "backlog": 2048,
        "accesslog": None,
        "loglevel": config.log_level.lower(),
        "proc_name": "torchbay-serve",
        "preload_app": True,  # the WSGI app already exists here; the model too when config.preload
        "limit_request_line": 8190,
        "control_socket_disable": True,  # several servers may share a home directory
    }


class _Application(BaseApplication):
    def __init__(self, wsgi: Callable[..., Any], options: dict[str, Any], serving: Serving,
                 worker_boot: Callable[[Optional[int]], None]) -> None:
        self._wsgi = wsgi
        self._options = options
        self._serving = serving
        self._worker_boot = worker_boot
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)
        serving, boot = self._serving, self._worker_boot
        log = serving.log

        gpus = serving.config.gpus

        def pre_fork(server: Any, worker: Any) -> None:  # in the master: the GPU this worker will use
            if gpus:
                worker.torchbay_gpu = assign_gpu(
                    (getattr(other, "torchbay_gpu", None) for other in server.WORKERS.values()), gpus)

        def post_fork(server: Any, worker: Any) -> None:
            boot(getattr(worker, "torchbay_gpu", None))
            serving.start_worker()

        def post_worker_init(worker: Any) -> None:
            serving.state.worker_ready(os.getpid())

        def worker_exit(server: Any, worker: Any) -> None:
            serving.state.worker_exiting(os.getpid())
            serving.stop_worker()

        def child_exit(server: Any, worker: Any) -> None:
            if serving.state.worker_gone(worker.pid):
                log.error("worker %d died unexpectedly; /ping answers 503 for %g s", worker.pid,
                          serving.config.crash_window)

        self.cfg.set("pre_fork", pre_fork)
        self.cfg.set("post_fork", post_fork)
        self.cfg.set("post_worker_init", post_worker_init)
        self.cfg.set("worker_exit", worker_exit)
        self.cfg.set("child_exit", child_exit)

    def load(self) -> Callable[..., Any]:
        return self._wsgi


class _Arbiter(Arbiter):
    """gunicorn's master loop, marking the shared state as stopping on SIGTERM/SIGINT/SIGQUIT."""

    serving: Optional[Serving] = None
    stop_signal: Optional[int] = None  # the signal that stopped the server, for the 128+N exit code

    def _mark_stopping(self, signum: int) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        if self.serving is not None:
            self.serving.state.set_stopping()

    def handle_term(self) -> None:
        self._mark_stopping(signal.SIGTERM)
        super().handle_term()

    def handle_int(self) -> None:
        self._mark_stopping(signal.SIGINT)
        super().handle_int()

    def handle_quit(self) -> None:
        self._mark_stopping(signal.SIGQUIT)
        super().handle_quit()


def run_server(serving: Serving, wsgi: Callable[..., Any], *,
               worker_boot: Callable[[Optional[int]], None]) -> int:
    """Run gunicorn in this process until it stops; its exit status.

    ``worker_boot(gpu)`` runs in each forked worker first, with the GPU index it was given (spread
    round-robin over ``config.gpus`` by :func:`assign_gpu`), or None on CPU.

    A clean stop by a signal exits 128+N (143 for SIGTERM), as ``docker stop`` and SageMaker expect of a
    process that ended on their signal; a failure keeps gunicorn's own code.
    """
    application = _Application(wsgi, gunicorn_options(serving), serving, worker_boot)
    arbiter = _Arbiter(application)
    arbiter.serving = serving
    code = 0
    try:
        arbiter.run()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    if code == 0 and arbiter.stop_signal is not None:
        return 128 + int(arbiter.stop_signal)
    return code

