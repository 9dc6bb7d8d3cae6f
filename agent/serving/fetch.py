"""Before serving: fetch and unpack ``model.tar.gz``, install ``code/requirements.txt`` (once per content)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Optional

from agent.errors import InstallError
from agent.safety import safe_extract_tar
from agent.storage import open_storage, redact

__all__ = ["fetch_model", "install_requirements"]

_MARKER = ".torchbay-model-source.json"


def fetch_model(uri: str, model_dir: Path, *, endpoint_url: Optional[str] = None,
                log: Optional[logging.Logger] = None) -> bool:
    """Download the archive at ``uri`` and unpack it safely into ``model_dir``.

    Skipped (returns False) when ``model_dir`` already holds this very archive (same URI, size
    and ETag). Raises StorageError/ObjectMissing, UnsafePathError or DiskFullError.
    """
    log = log or logging.getLogger("torchbay.serve")
    storage = open_storage(uri, endpoint_url=endpoint_url)
    info = storage.head(uri)
    if info is None:
        from agent.errors import ObjectMissing

        raise ObjectMissing(f"model archive {redact(uri)} does not exist; check TORCHBAY_MODEL_URI")
    source = {"uri": redact(uri), "size": info.size, "etag": info.etag}
    marker = model_dir / _MARKER
    try:
        if json.loads(marker.read_text()) == source:
            log.info("model from %s already unpacked in %s", redact(uri), model_dir)
            return False
    except (OSError, ValueError):
        pass
    model_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="torchbay-model-") as tmp:
        archive = Path(tmp) / "model.tar.gz"
        storage.get_file(uri, archive, expected_size=info.size)
        count = safe_extract_tar(archive, model_dir, what=f"model archive {redact(uri)}")
    marker.write_text(json.dumps(source))
    log.info("unpacked %d members of %s into %s", count, redact(uri), model_dir)
    return True


def install_requirements(code_dir: Path, *, env: Mapping[str, str], stamp_dir: Optional[Path] = None,
                         log: Optional[logging.Logger] = None) -> bool:
    """``pip install -r code/requirements.txt`` unless this environment already installed this exact file.

    Returns True when pip ran. The stamp (a hash of the file and the interpreter) lives in
    ``stamp_dir``, by default beside the installed packages (``sys.prefix``); no stamp when unwritable. Raises InstallError
    with pip's last lines when pip fails.
    """
    log = log or logging.getLogger("torchbay.serve")
    requirements = code_dir / "requirements.txt"
    if not requirements.is_file():
        return False
    digest = hashlib.sha256(requirements.read_bytes() + sys.executable.encode()).hexdigest()
    stamp = _stamp_path(stamp_dir)
    if stamp is not None and stamp.is_file() and stamp.read_text().strip() == digest:
        log.info("%s unchanged since it was installed; not reinstalling", requirements)
        return False
    log.info("installing %s", requirements)
    child_env = dict(env, PYTHONUNBUFFERED="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", "install", "--no-input", "-r", str(requirements)]
    proc = subprocess.Popen(cmd, cwd=str(code_dir), env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate()
    except BaseException:
        _kill_group(proc)
        raise
    if proc.returncode != 0:
        tail = "\n".join(output.decode("utf-8", "replace").strip().splitlines()[-8:])
        raise InstallError(f"pip install -r {requirements} failed with exit code {proc.returncode}; fix the file. "
                           f"pip said:\n{redact(tail)}")
    if stamp is not None:
        stamp.write_text(digest)
    return True


def _stamp_path(stamp_dir: Optional[Path]) -> Optional[Path]:
    folder = stamp_dir if stamp_dir is not None else Path(sys.prefix)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / ".torchbay-serve-requirements.sha256" if os.access(folder, os.W_OK) else None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
