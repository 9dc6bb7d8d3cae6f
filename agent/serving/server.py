"""The gunicorn launcher: this process becomes the master, the workers fork from it.

With preload (the default on CPU) the model was loaded here before the fork, so its weights
are shared copy-on-write by every worker. The master tracks which workers booted and which
died unexpectedly (``/ping`` reads it); SIGTERM drains in-flight requests and stops every
worker within the grace period.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.errors import HaltServer

from agent.serving.app import Serving
from agent.serving.config import assign_gpu
from agent.serving.worker import make_worker

__all__ = ["EXIT_BOOT_FAILED", "gunicorn_options", "run_server"]

EXIT_BOOT_FAILED = (
    3  # a worker could not boot (the model did not load): the server ends with it, once
)
_BOOT_RETRIES = (
    3  # boot failures tolerated while other workers serve (a replacement that fails at random)
)


def gunicorn_options(serving: Serving) -> dict[str, Any]:
    """The gunicorn settings for a ServeConfig."""
    config = serving.config
    return {
        "bind": [
            f"[{config.host}]:{config.port}"
            if ":" in config.host
            else f"{config.host}:{config.port}"
        ],
        "workers": config.workers,
        "worker_class": make_worker(serving),
        "threads": config.http_threads,
        # heartbeat only: slow requests are answered 504 first, stuck calls replace their worker
        # before this
        "timeout": max(30, int(config.stuck_timeout) + 30),
        "graceful_timeout": max(1, round(config.grace_period)),
        "keepalive": max(1, math.ceil(config.keepalive)),  # gunicorn takes whole seconds
        "backlog": 2048,
        "accesslog": None,
        "loglevel": config.log_level.lower(),
        "proc_name": "torchbay-serve",
        "preload_app": True,  # the WSGI app already exists here; the model too when config.preload
        "limit_request_line": 8190,
        "control_socket_disable": True,  # several servers may share a home directory
    }


class _Application(BaseApplication):  # type: ignore[misc]  # gunicorn ships no types
    def __init__(
        self,
        wsgi: Callable[..., Any],
        options: dict[str, Any],
        serving: Serving,
        worker_boot: Callable[[int | None], None],
    ) -> None:
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

        def pre_fork(
            server: Any, worker: Any
        ) -> None:  # in the master: the GPU this worker will use
            if gpus:
                worker.torchbay_gpu = assign_gpu(
                    (getattr(other, "torchbay_gpu", None) for other in server.WORKERS.values()),
                    gpus,
                )

        def post_fork(server: Any, worker: Any) -> None:
            boot(getattr(worker, "torchbay_gpu", None))
            serving.start_worker()

        def post_worker_init(worker: Any) -> None:
            serving.state.worker_ready(os.getpid())

        def worker_exit(server: Any, worker: Any) -> None:
            serving.state.worker_exiting(os.getpid())
            serving.stop_worker()

        def child_exit(server: Any, worker: Any) -> None:
            booted = serving.state.was_ready(worker.pid)
            if serving.state.worker_gone(worker.pid):
                log.error(
                    "worker %d died unexpectedly; it is replaced and /ping answers 503 for %g s",
                    worker.pid,
                    serving.config.crash_window,
                )
            if not booted and not getattr(server, "stopping", False):
                failures = serving.state.record_boot_failure()
                if serving.state.ready_workers() == 0 or failures >= _BOOT_RETRIES:
                    raise HaltServer(
                        f"worker {worker.pid} could not boot ({failures} boot failures); see the "
                        "error above",
                        EXIT_BOOT_FAILED,
                    )
                log.error(
                    "worker %d could not boot (%d so far); starting another", worker.pid, failures
                )

        self.cfg.set("pre_fork", pre_fork)
        self.cfg.set("post_fork", post_fork)
        self.cfg.set("post_worker_init", post_worker_init)
        self.cfg.set("worker_exit", worker_exit)
        self.cfg.set("child_exit", child_exit)

    def load(self) -> Callable[..., Any]:
        return self._wsgi


class _Arbiter(Arbiter):  # type: ignore[misc]  # gunicorn ships no types
    """gunicorn's master loop, marking the shared state as stopping on SIGTERM/SIGINT/SIGQUIT.

    gunicorn halts the whole server when any worker exits with 3 or 4 (its "failed to boot" and "app
    failed to load" codes), even long after boot, so ``os._exit(3)`` in model code ended the server.
    Here those codes mean nothing special: ``child_exit`` decides from the shared state whether the
    worker had booted (then it is replaced like any dead worker) or not (then boot failures end the
    server with :data:`EXIT_BOOT_FAILED`).
    """

    WORKER_BOOT_ERROR = -1  # never an exit status
    APP_LOAD_ERROR = -2
    serving: Serving | None = None
    stopping = False
    stop_signal: int | None = None  # the signal that stopped the server, for the 128+N exit code

    def _mark_stopping(self, signum: int) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        self.stopping = True
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


def run_server(
    serving: Serving, wsgi: Callable[..., Any], *, worker_boot: Callable[[int | None], None]
) -> int:
    """Run gunicorn in this process until it stops; its exit status.

    ``worker_boot(gpu)`` runs in each forked worker first, with the GPU index it was given (spread
    round-robin over ``config.gpus`` by :func:`assign_gpu`), or None on CPU.

    A clean stop by a signal exits 128+N (143 for SIGTERM), as ``docker stop`` and SageMaker expect
    of a
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
