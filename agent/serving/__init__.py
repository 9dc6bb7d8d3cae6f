"""``torchbay serve``: fetch the model, load it once, and serve it behind gunicorn + flask.

The SageMaker hosting contract on port 8080 (``SAGEMAKER_BIND_TO_PORT``): ``GET /ping``,
``POST /invocations``, ``GET /execution-parameters``, plus Prometheus ``GET /metrics``.
Nothing heavy (flask, gunicorn, numpy, torch) is imported until the config is resolved; torch is
imported once, in the master, before the workers fork.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from agent.cli import add_setting_flags
from agent.errors import ModelLoadError, TorchBayError, exit_code_for
from agent.serving.config import resolve_config
from agent.serving.fetch import fetch_model, install_requirements
from agent.serving.shared import SharedState
from agent.settings import Settings, read_settings

__all__ = ["EXIT_MODEL_LOAD", "EXIT_OK", "main", "parse_args"]

EXIT_OK = 0
EXIT_MODEL_LOAD = 3  # ModelLoadError: gunicorn's WORKER_BOOT_ERROR


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``torchbay serve``; every flag overrides its setting."""
    parser = argparse.ArgumentParser(prog="torchbay serve", description=__doc__.splitlines()[0])
    add_setting_flags(
        parser,
        {
            "--host": "serve_host",
            "--port": "serve_port",
            "--model-uri": "serve_model_uri",
            "--workers": "serve_workers",
            "--workers-per-gpu": "serve_workers_per_gpu",
            "--torch-threads": "serve_torch_threads",
            "--http-threads": "serve_http_threads",
            "--batch-size": "serve_batch_size",
            "--batch-delay-ms": "serve_batch_delay_ms",
            "--timeout": "serve_timeout",
            "--root": "root",
        },
    )
    parser.add_argument(
        "--no-preload",
        dest="serve_preload",
        action="store_const",
        const=False,
        help="load the model in each worker instead of once before the fork "
        "(TORCHBAY_SERVE_PRELOAD=false)",
    )
    return parser.parse_args(list(argv) if argv is not None else None)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Serve until SIGTERM; the exit code (3 when the model cannot be loaded)."""
    args = parse_args(argv)
    env = dict(os.environ if env is None else env)
    log = logging.getLogger("torchbay.serve")
    try:
        settings = read_settings(env)
        logging.basicConfig(
            level=settings.general.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s [serve] %(message)s",
        )
        return _serve(settings, vars(args), env, log)
    except TorchBayError as err:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        log.error(
            "%s: %s", err.kind if err.kind != "TorchBayError" else type(err).__name__, err.message
        )
        return exit_code_for(err)
    except Exception as err:  # top level: a bug; logged with its traceback
        log.exception("torchbay serve failed")
        return exit_code_for(err)


def _serve(
    settings: Settings, overrides: dict[str, Any], env: Mapping[str, str], log: logging.Logger
) -> int:
    gpus = _gpu_count(log, env)
    config = resolve_config(settings, overrides, gpus=gpus)
    if (
        settings.serving.serve_multi_model
    ):  # SAGEMAKER_MULTI_MODEL=true: the /models contract (agent.serving.multimodel)
        # flask, gunicorn, numpy, torch (~1.7 s): not before the config is resolved
        from agent.serving.multimodel import serve_multi_model

        return serve_multi_model(settings, config, env, log)
    log.info(
        "serving %s on %s:%d: %d workers x %d torch threads, %d requests each, batch %d (%g ms), "
        "preload %s, %d GPUs",
        config.model_dir,
        config.host,
        config.port,
        config.workers,
        config.torch_threads,
        config.http_threads,
        config.batch_size,
        config.batch_delay * 1000,
        config.preload,
        config.gpus,
    )
    if config.model_uri:
        fetch_model(
            config.model_uri, config.model_dir, endpoint_url=settings.general.endpoint_url, log=log
        )
    install_requirements(config.code_dir, env=env, log=log)

    # torch, flask, gunicorn, numpy (~1.7 s): once, in the master, after the config is resolved and
    # the requirements installed; importing agent.serving (as torchbay export does) stays light
    import torch

    from agent.serving.app import Serving, create_app  # flask, numpy: as torch above
    from agent.serving.model import ModelHandler  # torch: as above
    from agent.serving.server import run_server  # gunicorn: as above

    handler = ModelHandler(
        config.model_dir,
        config.code_dir,
        config.program,
        default_accept=config.default_accept,
        batch_size=config.batch_size,
        log=log,
        model_file=config.model_file,
        compile_program=config.compile_program,
    )
    if config.preload:
        # One thread in the master: no OpenMP pool exists to be broken by the fork.
        torch.set_num_threads(1)
        handler.load()
        handler.warm_up()
    serving = Serving(config, handler, SharedState(), log)
    # Everything loaded so far (torch, the model, torch.export's and inductor's state) is kept out
    # of the
    # workers' garbage collections: pages stay shared after the fork, and a worker exiting on
    # SIGTERM does
    # not spend seconds collecting the master's objects (measured: 8.7 s -> 1.0 s for an
    # ExportedProgram).
    gc.freeze()

    def worker_boot(gpu: int | None) -> None:
        torch.set_num_threads(config.torch_threads)
        if not handler.loaded:
            if gpu is not None:
                handler.use_gpu(gpu)
                log.info("worker %d serves on cuda:%d", os.getpid(), gpu)
            try:
                handler.load()
                handler.warm_up()
            except ModelLoadError as err:
                log.error("%s", err)
                sys.exit(EXIT_MODEL_LOAD)

    return run_server(serving, create_app(serving), worker_boot=worker_boot)


def _gpu_count(log: logging.Logger, env: Mapping[str, str]) -> int:
    """GPUs NVML sees, narrowed by CUDA_VISIBLE_DEVICES (without touching CUDA, so forking stays
    safe);
    0 with one INFO line when none."""
    try:
        import pynvml  # optional (no NVML on CPU hosts; ~30 ms): only to count the GPUs

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # no NVML library or driver: CPU serving
        log.info("no GPU found (%s); serving on CPU", type(err).__name__)
        return 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # cuda:N counts only the visible devices
        count = min(count, len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"]))
    if count == 0:
        log.info("no GPU found; serving on CPU")
    return count
