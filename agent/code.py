"""The user's code: fetch ``sagemaker_submit_directory`` into ``code/`` safely, then pip-install
what it needs.

Both steps remember what they did in the agent's folder (``output/torchbay``), so a job restarted on
the same machine neither downloads an unchanged source again nor reinstalls an unchanged
``requirements.txt`` or package.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.errors import InstallError, StorageError
from agent.job import Job
from agent.process import ProcessGroup, StopRequest, supervise
from agent.safety import safe_extract_tar
from agent.storage import Storage, open_storage, parse_uri, redact, write_text_atomically

__all__ = [
    "FETCHED",
    "INSTALLED",
    "KEPT",
    "NOTHING",
    "SKIPPED",
    "fetch_code",
    "install_requirements",
    "pip_install",
]

FETCHED, KEPT, SKIPPED, INSTALLED, NOTHING = "fetched", "kept", "skipped", "installed", "nothing"
_TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_PIP_TAIL_LINES = 15
_HASH_SKIP_DIRS = {"__pycache__", "build", ".git"}
_HASH_MAX_FILES = 5000


def _state(job: Job, name: str) -> Path:
    return job.layout.agent_dir / name


def _read_stamp(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, value: Any) -> None:
    write_text_atomically(path, json.dumps(value))


def _clear(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def fetch_code(
    job: Job,
    *,
    log: logging.Logger,
    storage_for: Callable[[str], Storage] = open_storage,
    cancel: threading.Event | None = None,
) -> str:
    """Put ``sagemaker_submit_directory`` (an s3:// or file:// tar.gz, a folder or a file) into
    ``code/``.

    Returns FETCHED, SKIPPED (same source as last time), KEPT (code/ already held files we did not
    put
    there, as on SageMaker images with baked-in code) or NOTHING (no source named). Archives are
    extracted
    with every member checked (UnsafePathError names a member that would land outside code/).
    ``cancel`` set (a stop asked of the agent) ends a download under way with DownloadStopped.
    """
    code_dir = job.layout.code_dir
    source = job.hyperparameters.get("sagemaker_submit_directory")
    if not source:
        return NOTHING
    source = str(source)
    if source.startswith("/"):
        source = "file://" + source
    location = parse_uri(source)
    storage = storage_for(source)
    info = storage.head(source)
    is_dir = location.scheme == "file" and Path(location.key).is_dir()
    if info is None and not is_dir:
        raise StorageError(
            f"sagemaker_submit_directory {redact(source)} does not exist; upload the source "
            "archive (tar -czf sourcedir.tar.gz -C src .) or fix the URI"
        )
    # not a folder: the object exists (checked above)
    identity = None if is_dir or info is None else [source, info.size, info.etag, info.mtime]
    size = info.size if info is not None else None
    stamp_path = _state(job, "code.json")
    code_dir.mkdir(parents=True, exist_ok=True)
    stamp = _read_stamp(stamp_path)
    has_files = any(code_dir.iterdir())
    if has_files and stamp is None:
        log.info(
            "code/ already holds files that TorchBay did not put there; keeping them and not "
            "fetching %s",
            redact(source),
        )
        return KEPT
    if has_files and identity is not None and stamp == identity:
        log.info(
            "code/ already holds %s (unchanged since the last run); not fetching it again",
            redact(source),
        )
        return SKIPPED
    if has_files:
        _clear(code_dir)
    stamp_path.unlink(missing_ok=True)
    if is_dir:
        shutil.copytree(location.key, code_dir, dirs_exist_ok=True)
    elif location.key.endswith(_TARBALL_SUFFIXES):
        archive = _state(job, "sourcedir.tar.gz")
        storage.get_file(source, archive, expected_size=size, cancel=cancel)
        try:
            count = safe_extract_tar(
                archive,
                code_dir,
                what=f"source archive {redact(source)}",
                max_bytes=job.settings.train.source_max_bytes,
                max_members=job.settings.train.source_max_members,
            )
        except BaseException:
            _clear(code_dir)
            raise
        finally:
            archive.unlink(missing_ok=True)
        log.info("fetched %s into %s (%d members)", redact(source), code_dir, count)
    else:
        name = location.key.rstrip("/").rsplit("/", 1)[-1]
        storage.get_file(source, code_dir / name, expected_size=size, cancel=cancel)
    _write_stamp(stamp_path, identity if identity is not None else [source, "folder"])
    return FETCHED


def _tree_digest(code_dir: Path, digest: Any) -> None:
    count = 0
    for folder, dirs, files in os.walk(code_dir):
        dirs[:] = sorted(
            d for d in dirs if d not in _HASH_SKIP_DIRS and not d.endswith(".egg-info")
        )
        for name in sorted(files):
            path = Path(folder) / name
            count += 1
            if count > _HASH_MAX_FILES:
                return
            digest.update(str(path.relative_to(code_dir)).encode())
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"?")


def _install_plan(code_dir: Path) -> tuple[list[str], str] | None:
    """(pip arguments, what) for code/, or None when there is nothing to install."""
    requirements = code_dir / "requirements.txt"
    is_package = (code_dir / "setup.py").is_file() or (code_dir / "pyproject.toml").is_file()
    if is_package:
        args = ["."] + (["-r", "requirements.txt"] if requirements.is_file() else [])
        return args, "the package in code/" + (
            " and requirements.txt" if requirements.is_file() else ""
        )
    if requirements.is_file():
        return ["-r", "requirements.txt"], "requirements.txt"
    return None


def install_requirements(
    job: Job,
    *,
    log: logging.Logger,
    stop: StopRequest | None = None,
    python: str = sys.executable,
) -> str:
    """pip-install code/'s package (setup.py/pyproject.toml) or requirements.txt, as the toolkit
    does.

    Returns INSTALLED, SKIPPED (the same files were installed by the same Python before) or NOTHING.
    A failing pip raises InstallError with pip's last lines; a stop request ends pip and returns
    (the caller checks ``stop``).
    """
    code_dir = job.layout.code_dir
    plan = _install_plan(code_dir)
    if plan is None:
        return NOTHING
    pip_args, what = plan
    digest = hashlib.sha256(json.dumps([python, pip_args]).encode())
    if pip_args[0] == ".":
        _tree_digest(code_dir, digest)
    else:
        digest.update((code_dir / "requirements.txt").read_bytes())
    env = dict(job.base_env)
    env.update(job.environment)
    installed = pip_install(
        pip_args,
        what=what,
        cwd=code_dir,
        env=env,
        key=digest.hexdigest(),
        stamp=_state(job, "install.json"),
        pip_log=_state(job, "pip.log"),
        log=log,
        timeout=job.settings.train.pip_timeout,
        stop=stop,
        python=python,
    )
    if installed is None:
        return NOTHING
    return INSTALLED if installed else SKIPPED


def pip_install(
    pip_args: Sequence[str],
    *,
    what: str,
    cwd: Path,
    env: Mapping[str, str],
    key: str,
    stamp: Path,
    pip_log: Path,
    log: logging.Logger,
    timeout: float | None = None,
    stop: StopRequest | None = None,
    python: str = sys.executable,
) -> bool | None:
    """``python -m pip install *pip_args`` in its own process group, unless ``stamp`` already holds
    ``key``.

    Returns True when pip ran, False when the stamp said the same install was done before, None when
    a stop
    request ended pip. A failing pip, or one past ``timeout`` seconds, raises InstallError with
    pip's last
    lines; the stamp is written only after a successful install, so a failed one is retried next
    time.
    """
    if _read_stamp(stamp) == key:
        log.info("%s unchanged since the last successful install; not reinstalling", what)
        return False
    stamp.unlink(missing_ok=True)
    pip_log.parent.mkdir(parents=True, exist_ok=True)
    argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *pip_args]
    needed = _guard(pip_args, cwd=cwd, what=what, workdir=pip_log.parent, log=log, python=python)
    if needed:
        argv += ["-c", str(pip_log.parent / "agent-constraints.txt")]
    child_env = dict(env)
    child_env.update(
        {"PYTHONUNBUFFERED": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    )
    log.info("installing %s: %s", what, " ".join(argv[1:]))
    with open(pip_log, "wb") as out:
        group = ProcessGroup(argv, env=child_env, cwd=cwd, stdout=out, stderr=out).start()
        result = supervise(group, stop=stop or StopRequest(), grace=10.0, max_runtime=timeout)
    if result.stopped_by == "signal":
        log.warning("pip install stopped by signal %s", result.signum)
        return None
    if result.stopped_by == "max_runtime" or result.exit_code != 0:
        if needed and result.stopped_by != "max_runtime":
            from agent.pipguard import conflict_from_pip  # the pip guard (~4 ms): on a failure

            conflict = conflict_from_pip(_tail(pip_log, 200), needed, what=what)
            if conflict is not None:
                raise conflict
        tail = _tail(pip_log, _PIP_TAIL_LINES)
        why = (
            f"took longer than {timeout:g} s (TORCHBAY_PIP_TIMEOUT)"
            if result.stopped_by == "max_runtime"
            else f"failed with exit code {result.exit_code}"
        )
        raise InstallError(
            f"pip install of {what} {why}; fix the file or pin a version that exists. pip's last "
            "lines:\n" + redact("\n".join(tail))
        )
    _write_stamp(stamp, key)
    log.info("installed %s in %.1f s", what, result.duration)
    return True


def _guard(
    pip_args: Sequence[str],
    *,
    cwd: Path,
    what: str,
    workdir: Path,
    log: logging.Logger,
    python: str,
) -> dict[str, Any]:
    """The pip guard (agent/pipguard.py): refuse a requirement that would replace a package the
    agent needs, and write the constraints file for pip; returns the agent's packages ({} when the
    guard is off)."""
    if os.path.abspath(python) != os.path.abspath(sys.executable):
        return {}  # another interpreter's environment is not the agent's
    try:
        # the pip guard (~4 ms): only for a job with requirements
        from agent.pipguard import agent_needs, check_requirement_files, write_constraints

        needed = agent_needs()
    except ImportError as err:  # packaging missing: an old image
        log.warning(
            "the pip guard is off (%s); the user's requirements could replace the agent's packages",
            err,
        )
        return {}
    if not needed:
        log.warning(
            "the pip guard is off: the torchbay distribution is not installed in %s", sys.prefix
        )
        return {}
    files = [
        cwd / pip_args[i + 1]
        for i, arg in enumerate(pip_args[:-1])
        if arg in ("-r", "--requirement")
    ]
    check_requirement_files(files, needed, what=what)
    write_constraints(needed, workdir / "agent-constraints.txt")
    return needed


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [redact(line) for line in text.splitlines() if line.strip()][-lines:]
