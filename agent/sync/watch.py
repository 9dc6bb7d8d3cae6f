"""Watching the folders with watchdog (inotify on Linux, polling elsewhere) and reading its events
as notes.

A note is ``(path, kind)`` with kind ``found`` (appeared, no write seen), ``created``, ``modified``,
``closed`` (closed after writing, or renamed in) or ``deleted``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from agent.sync.folders import walk_files

__all__ = ["event_notes", "start_observer"]


def start_observer(
    locals_: Sequence[Path], on_event: Callable[[Any], None], *, stable: float, log: logging.Logger
) -> tuple[Any, bool]:
    """Watch the folders recursively; returns (the started observer, whether it reports close
    events)."""
    # watchdog (~33 ms): only once live sync starts watching, after the script started
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer
    from watchdog.observers.polling import PollingObserver

    class _Handler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            on_event(event)

    close_events = True
    roots = sorted({local.resolve() for local in locals_})
    # Nested roots: watching the outer one recursively covers the inner one.
    roots = [r for r in roots if not any(o != r and o in r.parents for o in roots)]
    observer: Any = Observer()
    try:
        for root in roots:
            observer.schedule(_Handler(), str(root), recursive=True, event_filter=_event_filter())
        observer.start()
    except OSError as err:
        log.info(
            "live sync: no inotify here (%s); polling every second and uploading files once "
            "stable for %.1f s",
            err,
            stable,
        )
        close_events = False
        observer = PollingObserver(timeout=1.0)
        for root in roots:
            observer.schedule(_Handler(), str(root), recursive=True, event_filter=_event_filter())
        observer.start()
    if type(observer).__name__ != "InotifyObserver" and close_events:
        log.info(
            "live sync: %s gives no close events; files are uploaded once stable for %.1f s",
            type(observer).__name__,
            stable,
        )
        close_events = False
    return observer, close_events


def event_notes(event: Any, sent: Iterable[Path]) -> list[tuple[Path, str]]:
    """The notes one watchdog event makes; ``sent`` are the paths uploaded so far (for folder
    deletes)."""
    kind = event.event_type  # created, modified, closed, deleted, moved, opened, closed_no_write
    if kind in ("opened", "closed_no_write"):
        return []
    src = Path(os.fsdecode(event.src_path))
    notes: list[tuple[Path, str]] = []
    if event.is_directory:
        if kind in ("created", "moved"):
            target = Path(os.fsdecode(event.dest_path)) if kind == "moved" else src
            notes.extend((path, "found") for path in walk_files(target))
        if kind in ("deleted", "moved"):
            prefix = str(src) + os.sep
            notes.extend(
                (path, "deleted") for path in [p for p in sent if str(p).startswith(prefix)]
            )
    elif kind == "moved":
        notes.append((src, "deleted"))
        notes.append((Path(os.fsdecode(event.dest_path)), "closed"))
    else:
        notes.append((src, kind))
    return notes


def _event_filter() -> list[type]:
    """The events the sync acts on: no opens or read-only closes (the uploader's own reads make
    those)."""
    from watchdog import events as ev  # watchdog (~33 ms): only once live sync watches

    return [
        ev.FileCreatedEvent,
        ev.FileModifiedEvent,
        ev.FileClosedEvent,
        ev.FileDeletedEvent,
        ev.FileMovedEvent,
        ev.DirCreatedEvent,
        ev.DirDeletedEvent,
        ev.DirMovedEvent,
    ]
