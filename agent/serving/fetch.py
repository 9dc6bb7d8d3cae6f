"""Before serving: fetch and unpack ``model.tar.gz``, install ``code/requirements.txt`` (once per
content)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from agent.code import pip_install
from agent.errors import ObjectMissing
from agent.safety import safe_extract_tar
from agent.storage import open_storage, redact

__all__ = ["fetch_model", "install_requirements"]

_MARKER = ".torchbay-model-source.json"


def fetch_model(
    uri: str,
    model_dir: Path,
    *,
    endpoint_url: str | None = None,
    log: logging.Logger | None = None,
) -> bool:
    """Download the archive at ``uri`` and unpack it safely into ``model_dir``.

    Skipped (returns False) when ``model_dir`` already holds this very archive (same URI, size
    and ETag). Raises StorageError/ObjectMissing, UnsafePathError or DiskFullError.
    """
    log = log or logging.getLogger("torchbay.serve")
    storage = open_storage(uri, endpoint_url=endpoint_url)
    info = storage.head(uri)
    if info is None:
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


def install_requirements(
    code_dir: Path,
    *,
    env: Mapping[str, str],
    stamp_dir: Path | None = None,
    log: logging.Logger | None = None,
) -> bool:
    """``pip install -r code/requirements.txt`` unless this environment already installed this exact
    file.

    Returns True when pip ran. The stamp (a hash of the file and the interpreter) lives in
    ``stamp_dir``, by default beside the installed packages (``sys.prefix``); no stamp when
    unwritable. Raises InstallError
    with pip's last lines when pip fails.
    """
    log = log or logging.getLogger("torchbay.serve")
    requirements = code_dir / "requirements.txt"
    if not requirements.is_file():
        return False
    digest = hashlib.sha256(requirements.read_bytes() + sys.executable.encode()).hexdigest()
    with tempfile.TemporaryDirectory(prefix="torchbay-pip-") as tmp:
        # Unwritable stamp folder: a stamp nobody reads again, so pip runs every time.
        stamp = _stamp_path(stamp_dir) or Path(tmp) / "stamp.json"
        ran = pip_install(
            ["-r", str(requirements)],
            what=str(requirements),
            cwd=code_dir,
            env=env,
            key=digest,
            stamp=stamp,
            pip_log=Path(tmp) / "pip.log",
            log=log,
        )
    return bool(ran)


def _stamp_path(stamp_dir: Path | None) -> Path | None:
    folder = stamp_dir if stamp_dir is not None else Path(sys.prefix)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder / ".torchbay-serve-requirements.json" if os.access(folder, os.W_OK) else None
