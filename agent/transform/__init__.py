"""``torchbay transform --job spec.json``: a SageMaker batch transform job, anywhere.

The spec is shaped like a CreateTransformJob request. The job sends its records to a running
endpoint (``--endpoint``, TORCHBAY_TRANSFORM_ENDPOINT) or starts ``torchbay serve`` on 127.0.0.1 for
itself (the same serve entrypoint and settings as hosting, plus the spec's ``Environment``), and
writes ``<key>.out`` for each input object. Exit codes: 0 done; 65 a spec error or objects that
failed (named); 66 no input; 69 the endpoint or S3 unreachable; 128+N when signal N stopped it
(finished objects are kept, and a rerun skips them).
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

from agent.cli import add_setting_flags
from agent.errors import (
    EndpointUnreachable,
    ModelLoadError,
    TorchBayError,
    TransformError,
    exit_code_for,
)
from agent.settings import Settings, read_settings
from agent.transform.client import Endpoint
from agent.transform.run import Summary, run_job
from agent.transform.spec import read_transform_spec

# what signal.signal takes and returns
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

__all__ = ["main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``torchbay transform``."""
    parser = argparse.ArgumentParser(prog="torchbay transform", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--job", required=True, help="the CreateTransformJob-shaped spec: a path or the JSON itself"
    )
    # Help, parser and check come from the settings' declarations (agent.settings).
    add_setting_flags(parser, {"--endpoint": "transform_endpoint", "--root": "root"})
    return parser.parse_args(list(argv) if argv is not None else None)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the job; its exit code."""
    args = parse_args(argv)
    env = dict(os.environ if env is None else env)
    log = logging.getLogger("torchbay.transform")
    stop = threading.Event()
    signals: dict[int, _Handler] = {}
    stopped_by: list[int] = []

    def on_signal(signum: int, frame: object) -> None:  # only records it; the job loop acts
        stopped_by.append(signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signals[signum] = signal.signal(signum, on_signal)
    try:
        settings = read_settings(env)
        if args.root:
            settings = settings.replace(root=args.root)
        logging.basicConfig(
            level=settings.general.log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s [transform] %(message)s",
        )
        summary, name = _run(args, settings, env, stop, log)
        print(summary.line(name), flush=True)
        if stopped_by:
            return 128 + stopped_by[0]
        if summary.failures:
            error = TransformError(
                f"{len(summary.failures)} object(s) failed: " + "; ".join(summary.failures[:5])
            )
            log.error("%s", error.message)
            return error.exit_code
        return 0
    except TorchBayError as err:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        log.error("%s: %s", type(err).__name__, err.message)
        return exit_code_for(err)
    except Exception as err:  # top level: a bug; logged with its traceback
        log.exception("torchbay transform failed")
        return exit_code_for(err)
    finally:
        for number, previous in signals.items():
            signal.signal(number, previous)


def _run(
    args: argparse.Namespace,
    settings: Settings,
    env: Mapping[str, str],
    stop: threading.Event,
    log: logging.Logger,
) -> tuple[Summary, str]:
    spec = read_transform_spec(args.job)
    url: str | None = args.transform_endpoint or settings.transform.transform_endpoint
    server = _StartedServer(settings, env, spec.environment, log) if url is None else None

    def connect() -> Endpoint:  # called only when some object is left to transform
        if server is not None:
            address = server.start(settings.transform.transform_startup_timeout, stop)
        else:
            assert url is not None  # no server is started only when an endpoint was given
            address = url
        return Endpoint(address, timeout=spec.timeout, max_retries=spec.max_retries)

    try:
        summary = run_job(
            spec,
            connect,
            endpoint_url=settings.general.endpoint_url,
            stop=stop,
            progress_interval=settings.transform.transform_progress_interval,
            log=log,
        )
    finally:
        if server is not None:
            server.stop()
    return summary, spec.name


class _StartedServer:
    """``torchbay serve`` on a free port of 127.0.0.1, in its own process group, for one job."""

    def __init__(
        self,
        settings: Settings,
        env: Mapping[str, str],
        extra: Mapping[str, str],
        log: logging.Logger,
    ) -> None:
        self._env = dict(env)
        self._env.update(extra)
        self._env.update({"PYTHONUNBUFFERED": "1", "TORCHBAY_ROOT": str(settings.general.root)})
        self._grace = settings.serving.serve_grace_period + 5
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float, stop: threading.Event) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=self._env,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        self._log.info("started torchbay serve (pid %d) on %s for the job", self._proc.pid, url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set():
            code = self._proc.poll()
            if code is not None:
                raise ModelLoadError(
                    f"the started `torchbay serve` exited with {code} before it was ready; see its "
                    "log lines above"
                )
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/ping")
                if conn.getresponse().status == 200:
                    conn.close()
                    return url
                conn.close()
            except OSError:
                pass
            time.sleep(0.2)
        raise EndpointUnreachable(
            f"the started `torchbay serve` did not answer /ping 200 within {timeout:g} s; "
            "raise TORCHBAY_TRANSFORM_STARTUP_TIMEOUT or see its log lines above"
        )

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self._grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
