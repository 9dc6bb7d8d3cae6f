"""One transform job over an endpoint: list, split, send, assemble, upload, resume, report.

Objects are taken in listing order; each is read whole, split and packed into requests, and up to
``MaxConcurrentTransforms`` requests (of any objects) are in flight at once. An object's ``.out`` is
uploaded when all its requests are answered, with a marker (S3 object metadata; a hidden
``.<name>.torchbay`` file beside it for ``file://``) holding the input's ETag and the hash of the
spec's
output-deciding keys: a rerun skips every object whose marker matches. A request that still fails
after
its retries is split in halves until the failing record is found; its object gets no ``.out`` and
the
job fails naming the object and the record, after every other object was finished and uploaded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agent.data.listing import Entry, list_channel
from agent.errors import EndpointUnreachable, ObjectMissing, StorageError, TransformError
from agent.storage import JobStorage, S3Storage, Storage, parse_uri, redact
from agent.transform.assemble import Assembler
from agent.transform.client import Endpoint, Reply
from agent.transform.spec import TransformSpec
from agent.transform.split import Batch, Record, decompress, pack, split_records

__all__ = ["Plan", "Summary", "plan_job", "run_job"]

_READ_AHEAD = 256 * 1024 * 1024  # input bytes read ahead of the objects being sent, at least
_MARK_SOURCE = "torchbay-source"
_MARK_SPEC = "torchbay-spec"
_Sent = list[tuple[tuple["Record", ...], bytes, str]]  # (records, response body, its type)


@dataclass(frozen=True)
class Plan:
    """What the job does, after the spec met the container's ``/execution-parameters``."""

    max_concurrent: int
    multi_record: bool
    max_payload_bytes: int


@dataclass
class Summary:
    """What a job did; ``failures`` name each object that got no output and why."""

    objects: int = 0
    done: int = 0
    skipped: int = 0
    records: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    interrupted: bool = False

    def line(self, name: str) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        return (
            f"transform job {name}: {self.done} of {self.objects} objects written, {self.skipped} "
            "skipped as "
            f"already done, {len(self.failures)} failed; {self.records} records in {self.requests} "
            "requests "
            f"({self.retries} retried) in {self.seconds:.1f} s ({rate:,.0f} records/s)"
            + ("; interrupted" if self.interrupted else "")
        )


def plan_job(spec: TransformSpec, endpoint: Endpoint) -> Plan:
    """The spec's values, else the container's ``/execution-parameters``, else SageMaker's
    defaults."""
    params = endpoint.get_json("/execution-parameters") or {}
    concurrent = spec.max_concurrent or _positive_int(params.get("MaxConcurrentTransforms")) or 1
    strategy = spec.batch_strategy
    if strategy is None:
        strategy = (
            "MultiRecord"
            if str(params.get("BatchStrategy", "")).upper() == "MULTI_RECORD"
            else "SingleRecord"
        )
    payload = spec.max_payload_mb or _positive_int(params.get("MaxPayloadInMB")) or 6
    return Plan(concurrent, strategy == "MultiRecord", payload * 1024 * 1024)


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class _Progress:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records_done = 0
        self.records_known = 0
        self.bytes_total = 0
        self.bytes_done = 0.0
        self.objects_done = 0


def run_job(
    spec: TransformSpec,
    endpoint: Endpoint | Callable[[], Endpoint],
    *,
    endpoint_url: str | None = None,
    stop: threading.Event | None = None,
    progress_interval: float = 10.0,
    log: logging.Logger | None = None,
) -> Summary:
    """Run the job to its end (or until ``stop`` is set); the Summary says what happened.

    ``endpoint`` may be a callable that makes one (starting a server): it is called only when some
    object
    is not done yet.
    """
    log = log or logging.getLogger("torchbay.transform")
    stop = stop or threading.Event()
    started = time.monotonic()
    assembler = Assembler(
        content_type=spec.content_type,
        accept=spec.accept,
        input_filter=spec.input_filter,
        output_filter=spec.output_filter,
        join_source=spec.join_source,
        assemble_with=spec.assemble_with,
    )
    storages = JobStorage(endpoint_url)  # one S3 client for the input and the output
    source = storages.for_uri(spec.input_uri)
    target = storages.for_uri(spec.output_uri)
    entries = list_channel(source, spec.input_uri, spec.input_type, channel="TransformInput")
    summary = Summary(objects=len(entries))
    todo = []
    for (
        entry
    ) in entries:  # the markers first: a job with nothing left to do never needs the endpoint
        out_uri = _output_uri(spec.output_uri, entry.relative)
        mark = {_MARK_SOURCE: _identity(source, entry), _MARK_SPEC: spec.digest}
        if _read_mark(target, out_uri) == mark:
            summary.skipped += 1
        else:
            todo.append((entry, out_uri, mark))
    if not todo:
        summary.seconds = time.monotonic() - started
        log.info("transform job %s: all %d objects are already done", spec.name, len(entries))
        return summary
    if not isinstance(endpoint, Endpoint):
        endpoint = endpoint()
    plan = plan_job(spec, endpoint)
    progress = _Progress()
    log.info(
        "transform job %s: %d objects from %s to %s; %s, %d requests at once, %d bytes per request "
        "at most",
        spec.name,
        len(entries),
        redact(spec.input_uri),
        redact(spec.output_uri),
        "MultiRecord" if plan.multi_record else "SingleRecord",
        plan.max_concurrent,
        plan.max_payload_bytes,
    )
    headers = {"Content-Type": spec.content_type or "application/octet-stream"}
    if spec.accept:
        headers["Accept"] = spec.accept
    joiner = b"\n" if spec.split_type == "Line" else b""
    senders = ThreadPoolExecutor(plan.max_concurrent, thread_name_prefix="torchbay-transform")
    finishers = ThreadPoolExecutor(2, thread_name_prefix="torchbay-transform-out")
    window = threading.BoundedSemaphore(plan.max_concurrent * 2)  # requests queued or in flight
    # Input bytes held in memory (objects read and not yet written): always one object, more while
    # they fit.
    held = _Held(max(_READ_AHEAD, 4 * plan.max_concurrent * plan.max_payload_bytes))
    requests = [0]
    counter_lock = threading.Lock()
    reporter = _Reporter(
        spec.name, summary, progress, len(entries), progress_interval, started, log
    )
    reporter.start()
    pending: list[Future[None]] = []
    fatal: list[BaseException] = []

    def send(batch: Batch, what: str) -> _Sent:
        with counter_lock:
            requests[0] += 1
        reply = endpoint.request("POST", "/invocations", batch.body, headers)
        if reply.ok:
            return [(batch.records, reply.body, reply.content_type)]
        if len(batch.records) > 1:  # find the record that fails: each half on its own
            half = len(batch.records) // 2
            out: _Sent = []
            for part in (batch.records[:half], batch.records[half:]):
                out.extend(send(Batch(part, joiner.join(r.data for r in part)), what))
            return out
        raise TransformError(_failure(what, batch.records[0], reply))

    def submit(batch: Batch, what: str, size_share: float) -> Future[_Sent]:
        window.acquire()

        def task() -> _Sent:
            try:
                result = send(batch, what)
                with progress.lock:
                    progress.records_done += len(batch.records)
                    progress.bytes_done += size_share
                return result
            finally:
                window.release()

        try:
            return senders.submit(task)
        except RuntimeError:
            window.release()
            raise CancelledError() from None

    def finish(
        entry: Entry,
        out_uri: str,
        originals: dict[int, Record],
        futures: Sequence[Future[_Sent]],
        mark: dict[str, str],
        complete: bool,
        charge: int,
    ) -> None:
        what = entry.uri
        try:
            if not complete:
                for future in futures:
                    future.cancel()
                raise CancelledError()
            responses = []
            failure: BaseException | None = None
            for future in futures:
                try:
                    responses.extend(future.result())
                except (TransformError, EndpointUnreachable) as err:
                    failure = failure or err
            if failure is not None:
                raise failure
            body = assembler.assemble(
                [
                    (tuple(originals[r.number] for r in records), data, ctype)
                    for records, data, ctype in responses
                ],
                what,
            )
            _write_marked(target, out_uri, body, mark)
            with progress.lock:
                progress.objects_done += 1
            summary.done += 1
            log.debug("wrote %s (%d bytes)", redact(out_uri), len(body))
        except CancelledError:
            summary.interrupted = True
        except EndpointUnreachable as err:
            fatal.append(err)
            summary.failures.append(f"{redact(what)}: {err.message}")
        except TransformError as err:
            summary.failures.append(
                err.message
                if err.message.startswith(redact(what))
                else f"{redact(what)}: {err.message}"
            )
            log.error("%s", summary.failures[-1])
        finally:
            held.give(charge)

    try:
        for entry, out_uri, mark in todo:
            if stop.is_set() or fatal:
                summary.interrupted = summary.interrupted or stop.is_set()
                break
            charge = entry.size if entry.size is not None else plan.max_payload_bytes
            held.take(charge)
            what = redact(entry.uri)
            try:
                data = decompress(source.get_bytes(entry.uri), spec.compression, what)
                records = split_records(data, spec.split_type, what)
                originals = {r.number: r for r in records}
                sent = (
                    [assembler.filter_input(r, what) for r in records]
                    if assembler.input_format
                    else records
                )
                batches = pack(
                    sent, spec.split_type, plan.multi_record, plan.max_payload_bytes, what
                )
            except TransformError as err:
                summary.failures.append(err.message)
                log.error("%s", err.message)
                held.give(charge)
                continue
            size = entry.size if entry.size is not None else len(data)
            with progress.lock:
                progress.records_known += len(records)
                progress.bytes_total += size
            share = size / len(batches) if batches else 0.0
            futures = []
            complete = True
            try:
                for batch in batches:
                    if stop.is_set():
                        raise CancelledError()
                    futures.append(submit(batch, what, share))
            except CancelledError:
                summary.interrupted, complete = True, False
            summary.records += len(records)
            pending.append(
                finishers.submit(finish, entry, out_uri, originals, futures, mark, complete, charge)
            )
    finally:
        if stop.is_set():
            summary.interrupted = True
        senders.shutdown(wait=True, cancel_futures=stop.is_set())
        finishers.shutdown(wait=True)
        reporter.stop()
    summary.requests = requests[0]
    summary.retries = endpoint.retries
    summary.seconds = time.monotonic() - started
    if fatal:
        raise fatal[0]
    return summary


class _Held:
    """Bytes held in memory: ``take`` waits while others hold some and ``n`` more would pass
    ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            while self._held > 0 and self._held + n > self._limit:
                self._cond.wait()
            self._held += n

    def give(self, n: int) -> None:
        with self._cond:
            self._held -= n
            self._cond.notify_all()


def _failure(what: str, record: Record, reply: Reply) -> str:
    tries = f" after {reply.attempts} attempts" if reply.attempts > 1 else ""
    return (
        f"{what} record {record.number}: the endpoint answered {reply.status}{tries}: "
        f"{reply.reason()}; fix the "
        "record or the model, then run the job again (finished objects are skipped)"
    )


def _output_uri(output_prefix: str, relative: str) -> str:
    return parse_uri(output_prefix).child(relative + ".out").uri


def _identity(storage: Storage, entry: Entry) -> str:
    """What identifies this version of the input: its ETag, else size and mtime."""
    etag, size = entry.etag, entry.size
    mtime = None
    if etag is None:
        info = storage.head(entry.uri)
        if info is not None:
            etag, size, mtime = info.etag, info.size, info.mtime
    return etag or f"{size}:{mtime}"


def _sidecar(uri: str) -> str:
    loc = parse_uri(uri)
    folder, _, name = loc.key.rpartition("/")
    return "file://" + f"{folder}/.{name}.torchbay"


def _read_mark(storage: Storage, uri: str) -> dict[str, str] | None:
    loc = parse_uri(uri)
    if isinstance(storage, S3Storage):
        client = storage.client
        try:
            head = storage.call(uri, lambda: client.head_object(Bucket=loc.bucket, Key=loc.key))
        except ObjectMissing:
            return None
        meta = head.get("Metadata", {})
        return {key: meta[key] for key in (_MARK_SOURCE, _MARK_SPEC) if key in meta}
    try:
        if storage.head(uri) is None:
            return None
        mark = json.loads(storage.get_bytes(_sidecar(uri)))
    except (
        OSError,
        ValueError,
        StorageError,
    ):  # no sidecar, or a torn one: the object is done again
        return None
    return mark if isinstance(mark, dict) else None


def _write_marked(storage: Storage, uri: str, body: bytes, mark: dict[str, str]) -> None:
    loc = parse_uri(uri)
    if isinstance(storage, S3Storage):
        client = storage.client
        storage.call(
            uri,
            lambda: client.put_object(Bucket=loc.bucket, Key=loc.key, Body=body, Metadata=mark),
        )
        return
    storage.put_bytes(body, uri)
    storage.put_bytes(json.dumps(mark).encode(), _sidecar(uri))


class _Reporter:
    """A progress line every ``interval`` seconds: records, objects, rate, ETA (from the bytes
    done)."""

    def __init__(
        self,
        name: str,
        summary: Summary,
        progress: _Progress,
        objects: int,
        interval: float,
        started: float,
        log: logging.Logger,
    ) -> None:
        self._name, self._summary, self._progress = name, summary, progress
        self._objects, self._interval, self._started, self._log = objects, interval, started, log
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="torchbay-transform-progress", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._log.info("%s", self.line())

    def line(self) -> str:
        p = self._progress
        with p.lock:
            done, known, objects = p.records_done, p.records_known, p.objects_done
            bytes_done, bytes_total = p.bytes_done, p.bytes_total
        elapsed = max(1e-9, time.monotonic() - self._started)
        rate = done / elapsed
        remaining_objects = self._objects - objects - self._summary.skipped
        if bytes_done > 0 and remaining_objects > 0:
            # Bytes of objects not read yet are unknown until read: assume they are like the ones
            # seen.
            per_object = bytes_total / max(1, objects + (1 if bytes_total > bytes_done else 0))
            left = max(0.0, bytes_total - bytes_done) + per_object * max(0, remaining_objects - 1)
            eta = f"{left / (bytes_done / elapsed):,.0f} s"
        else:
            eta = "-" if remaining_objects > 0 else "0 s"
        return (
            f"transform job {self._name}: {done:,} of {known:,} records read so far, {objects} of "
            f"{self._objects} objects written ({self._summary.skipped} skipped), {rate:,.0f} "
            "records/s, "
            f"ETA {eta}"
        )
