"""Staging worker processes, for lists too long for one process's Python to keep up with.

Workers are plain `python -c ...` children (not multiprocessing, which would re-import the
agent's __main__): the job list goes in on stdin as JSON, progress and the outcome come back as JSON
lines.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import agent.errors as errors_mod
from agent.data.fetch import Counters, FetchJob, run_in_process
from agent.data.options import StageOptions
from agent.errors import StorageError, TorchBayError
from agent.storage import ShortRead, TransientError

__all__ = ["run_processes", "worker_main"]


def run_processes(
    jobs: Sequence[FetchJob],
    options: StageOptions,
    processes: int,
    tick: Callable[[int, int], None],
    cancel: threading.Event | None = None,
) -> int:
    """Fetch ``jobs`` in ``processes`` worker processes; returns the bytes fetched. Raises the first
    error a worker reports. ``tick(files, bytes)`` gets the counts at least every 0.5 s; once
    ``cancel`` is set the workers are ended and the bytes so far returned."""
    # Largest first, dealt round-robin, so every worker gets a similar share of bytes.
    ordered = sorted(jobs, key=lambda job: -(job.size or 0))
    threads = max(4, options.threads // processes)
    worker_options = {**options.__dict__, "threads": threads, "processes": 1, "child_env": None}
    env = (
        dict(options.child_env, PYTHONUNBUFFERED="1") if options.child_env else None
    )  # None: inherit ours
    package_root = str(Path(__file__).resolve().parents[2])
    argv = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {package_root!r}); "
        "from agent.data.staging_workers import worker_main; sys.exit(worker_main())",
    ]
    messages: queue_mod.Queue[tuple[int, dict[str, Any]]] = queue_mod.Queue()
    children: list[subprocess.Popen[bytes]] = []

    def pump(index: int, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                messages.put((index, json.loads(line)))
            except ValueError:
                continue
        messages.put((index, {"kind": "eof"}))

    try:
        for index in range(processes):
            child = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True
            )
            children.append(child)
            payload = {
                "index": index,
                "options": worker_options,
                "jobs": [job.__dict__ for job in ordered[index::processes]],
            }
            assert child.stdin is not None
            child.stdin.write(json.dumps(payload).encode())
            child.stdin.close()
            threading.Thread(target=pump, args=(index, child), daemon=True).start()
        files = [0] * processes
        nbytes = [0] * processes
        finished: set[int] = set()
        while len(finished) < processes:
            if cancel is not None and cancel.is_set():
                break  # the workers are ended below
            try:
                index, message = messages.get(timeout=0.5)
            except queue_mod.Empty:
                tick(sum(files), sum(nbytes))
                continue
            kind = message.get("kind")
            if kind in ("progress", "done"):
                files[index], nbytes[index] = message["files"], message["bytes"]
                if kind == "done":
                    finished.add(index)
            elif kind == "error":
                cls = getattr(errors_mod, str(message.get("error")), StorageError)
                if not (isinstance(cls, type) and issubclass(cls, TorchBayError)):
                    cls = StorageError
                raise cls(str(message.get("message")))
            elif kind == "eof" and index not in finished:
                code = children[index].wait()
                raise StorageError(
                    f"staging worker {index} exited with code {code} before finishing; "
                    "see its output above"
                )
            tick(sum(files), sum(nbytes))
        return sum(nbytes)
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            if child.stdout is not None:
                child.stdout.close()


def worker_main() -> int:
    """A staging worker process: reads its jobs from stdin, writes JSON lines to stdout."""
    spec = json.loads(sys.stdin.buffer.read())
    index = spec["index"]
    options = StageOptions(**spec["options"])
    jobs = [FetchJob(**job) for job in spec["jobs"]]
    lock = threading.Lock()

    def emit(message: dict[str, Any]) -> None:
        with lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    counters = Counters()
    last = [0.0]

    def tick(files: int, nbytes: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            emit({"kind": "progress", "files": files, "bytes": nbytes})

    try:
        run_in_process(jobs, options, counters, tick)
    except TorchBayError as err:
        # the kinds agent.storage adds travel as their agent.errors base
        name = (
            "StorageError" if isinstance(err, (ShortRead, TransientError)) else type(err).__name__
        )
        emit({"kind": "error", "error": name, "message": str(err)})
        return 1
    except Exception as err:  # top level of a worker process: report it; the parent raises
        emit(
            {
                "kind": "error",
                "error": "StorageError",
                "message": f"staging worker {index} failed: {type(err).__name__}: {err}",
            }
        )
        return 1
    emit({"kind": "done", "files": counters.files, "bytes": counters.bytes})
    return 0
