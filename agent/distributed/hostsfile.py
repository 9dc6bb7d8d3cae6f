"""Make every name of ``SM_HOSTS`` resolve on this host: names that do not resolve are added to the
hosts file (``TORCHBAY_HOSTS_FILE``, ``/etc/hosts``) with the addresses the identity exchange found.

The agent's lines sit between two marker comments naming the job, replaced as a whole on the next
job; nothing else in the file changes. The file is rewritten in place (container runtimes bind-mount
``/etc/hosts``, so a rename would fail). When the file may not be written the names stay
unresolvable here and one WARNING says so, with the addresses.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ensure_resolvable", "resolves"]

_BEGIN = "# torchbay: hosts of job {job} (begin)"
_END = "# torchbay: end"


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
        return True
    except (OSError, UnicodeError):
        return False


def _without_ours(lines: Sequence[str]) -> list[str]:
    kept, inside = [], False
    for line in lines:
        if line.startswith("# torchbay: hosts of job "):
            inside = True
        elif inside and line.strip() == _END:
            inside = False
        elif not inside:
            kept.append(line)
    return kept


def ensure_resolvable(
    hosts: Sequence[str],
    table: Mapping[str, str],
    *,
    job: str,
    hosts_file: Path,
    log: logging.Logger,
) -> dict[str, str]:
    """{host: how it resolves here} for each of ``hosts``, after adding the missing ones to
    ``hosts_file``.

    Logs the outcome once (INFO, or a WARNING for names that still do not resolve).
    """
    missing = [h for h in hosts if not resolves(h) and table.get(h)]
    outcome = {h: "resolves" for h in hosts if h not in missing}
    if missing:
        try:
            text = hosts_file.read_text() if hosts_file.exists() else ""
            lines = _without_ours(text.splitlines())
            lines += [_BEGIN.format(job=job), *(f"{table[h]} {h}" for h in missing), _END]
            with open(hosts_file, "w") as handle:  # in place: /etc/hosts is often a bind mount
                handle.write("\n".join(lines) + "\n")
            for host in missing:
                outcome[host] = f"added to {hosts_file} as {table[host]}"
        except OSError as err:
            for host in missing:
                outcome[host] = f"does NOT resolve (address {table[host]})"
            log.warning(
                "cannot add %s to %s (%s): these names do not resolve on this host, so a script "
                "that "
                "connects to a host by name (MASTER_ADDR=hosts[0]) fails here; the agent's own "
                "MASTER_ADDR "
                "still works. Make %s writable, or give resolvable names (SM_HOSTS or "
                "TORCHBAY_HOSTS)",
                ", ".join(missing),
                hosts_file,
                err,
                hosts_file,
            )
    still = [h for h in hosts if h not in outcome]
    for host in still:
        outcome[host] = "does NOT resolve (no address known)"
    log.info("host names: %s", ", ".join(f"{h} {outcome[h]}" for h in hosts))
    return outcome
