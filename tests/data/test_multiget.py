"""The one-thread multiplexed GETs (agent.storage.multiget) against a raw HTTP server that answers
as real servers and broken ones do: keep-alive, ``Connection: close``, connections closed without
notice, stalls mid-body, more bytes than the Content-Length, wrong sizes, error statuses; and
through stage(), a channel of small and large objects where the misses go to the threaded path."""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.data.listing import Entry
from agent.data.staging import StageOptions, stage
from agent.storage.checked import CheckedRead
from agent.storage.lean import LeanGetter
from agent.storage.multiget import Missed, get_many
from agent.storage.retry import ShortRead
from tests.data.helpers import tree


class RawServer:
    """GET /bucket/key answered from ``objects`` over raw sockets, by ``behaviour[key]`` (default
    ``ok``) and the connection policy ``close`` (``none``: keep-alive; ``said``: a
    ``Connection: close`` header, then closed; ``silent``: closed after each answer without a
    word, so the client's next request on it finds it dead). ``once``: each bad behaviour is
    used up by its first answer, the next GET of the key is answered right. Signatures are not
    checked."""

    def __init__(self, objects: dict[str, bytes], close: str = "none", once: bool = False) -> None:
        self.objects, self.close, self.once = objects, close, once
        self.behaviour: dict[str, str] = {}
        self.requests: list[str] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            pending = b""
            while not self._stop.is_set():
                while b"\r\n\r\n" not in pending:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    pending += data
                head, _, pending = pending.partition(b"\r\n\r\n")
                path = head.split(b"\r\n")[0].split()[1].decode()
                key = path.split("?")[0].split("/", 2)[2]
                with self._lock:
                    self.requests.append(key)
                if not self._answer(conn, key) or self.close != "none":
                    return

    def _answer(self, conn: socket.socket, key: str) -> bool:
        """Answer one GET; False when the connection is to be closed."""
        body = self.objects.get(key)
        with self._lock:
            how = self.behaviour.pop(key, "ok") if self.once else self.behaviour.get(key, "ok")
        if body is None or how == "503":
            error = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
            status = b"404 Not Found" if body is None else b"503 Slow Down"
            conn.sendall(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
                b"Content-Length: " + str(len(error)).encode() + b"\r\n\r\n" + error
            )
            return True
        length = len(body) + 1 if how == "longer" else len(body)
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b'ETag: "' + hashlib.md5(body).hexdigest().encode() + b'"\r\n'
            b"Content-Length: "
            + str(length).encode()
            + b"\r\n"
            + (b"Connection: close\r\n" if self.close == "said" else b"")
            + b"\r\n"
        )
        if how == "stall":  # the head and half the body, then nothing
            conn.sendall(head + body[: len(body) // 2])
            self._stop.wait(30)
            return False
        if how == "extra":  # more bytes than the Content-Length, in the same write
            conn.sendall(head + body + b"GARBAGE")
            return False
        if how == "flip":
            body = bytes([body[0] ^ 1]) + body[1:]
        conn.sendall(head + body)
        return True

    def shutdown(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


@pytest.fixture
def objects() -> dict[str, bytes]:
    return {f"o/{i:03d}.bin": bytes([i]) * (1000 + 37 * i) for i in range(40)}


@pytest.fixture
def raw(objects: dict[str, bytes], dummy_creds: dict[str, str]) -> Iterator[object]:
    made: list[RawServer] = []

    def make(*args: object, **kwargs: object) -> RawServer:
        made.append(RawServer(objects, *args, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.shutdown()


def _lean(server: RawServer) -> LeanGetter:
    lean = LeanGetter.from_endpoint(server.endpoint, timeout=5)
    assert lean is not None
    return lean


def _get_all(
    server: RawServer, keys: list[str], sizes: dict[str, int], **kwargs: object
) -> tuple[dict[str, bytes], Missed[str]]:
    lean = _lean(server)
    got: dict[str, bytes] = {}

    def deliver(key: str, body: CheckedRead) -> None:
        got[key] = body.read_all()

    items = ((f"s3://bkt/{key}", sizes.get(key), key) for key in keys)
    missed = get_many(lean, items, deliver, **kwargs)  # type: ignore[arg-type]
    return got, missed


@pytest.mark.parametrize("close", ["none", "said", "silent"])
def test_every_object_arrives_whatever_the_connection_policy(raw, objects, close):
    server = raw(close=close)
    sizes = {k: len(v) for k, v in objects.items()}
    got, missed = _get_all(server, sorted(objects), sizes, connections=4)
    assert got == objects
    assert missed.spent == [] and missed.other == []
    if close == "none":
        assert server.connections <= 4  # kept alive: one connection per slot
        assert len(server.requests) == len(objects)
    else:
        # "said": a fresh connection per object; "silent": each reuse finds the connection dead
        # before any byte and is sent once more on a fresh one, so no object is lost
        assert server.connections >= len(objects)
        assert len(set(server.requests)) == len(objects)


def test_bad_answers_are_missed_by_kind_and_the_rest_delivered(raw, objects):
    server = raw()
    keys = sorted(objects)
    server.behaviour.update({keys[1]: "503", keys[2]: "flip", keys[3]: "longer", keys[4]: "extra"})
    sizes = {k: len(v) for k, v in objects.items()}
    sizes[keys[5]] = sizes[keys[5]] + 3  # the listing says otherwise: the object changed
    got, missed = _get_all(server, [*keys, "o/missing.bin"], sizes, connections=3)
    assert set(missed.other) == {keys[1], "o/missing.bin"}  # answers for the caller's path
    assert set(missed.spent) == {keys[2], keys[3], keys[4], keys[5]}  # failed attempts
    assert got == {k: v for k, v in objects.items() if k not in missed.spent + missed.other}


def test_a_stalled_answer_is_missed_after_the_timeout_not_waited_for(raw, objects):
    server = raw()
    keys = sorted(objects)
    server.behaviour[keys[7]] = "stall"
    sizes = {k: len(v) for k, v in objects.items()}
    started = time.monotonic()
    # A timeout a busy 2-core machine never reaches on a healthy answer; the stall lasts 30 s.
    got, missed = _get_all(server, keys, sizes, connections=4, timeout=2.0)
    assert missed.spent == [keys[7]] and missed.other == []
    assert len(got) == len(keys) - 1
    assert time.monotonic() - started < 15  # the other connections went on meanwhile


def test_cancel_hands_back_what_was_not_delivered(raw, objects):
    server = raw()
    keys = sorted(objects)
    cancel = threading.Event()
    lean = _lean(server)
    got: list[str] = []

    def deliver(key: str, body: CheckedRead) -> None:
        body.read_all()
        got.append(key)
        if len(got) == 5:
            cancel.set()

    items = ((f"s3://bkt/{key}", len(objects[key]), key) for key in keys)
    missed = get_many(lean, items, deliver, connections=2, cancel=cancel)
    assert missed.spent == []
    assert sorted(got + missed.other) == keys  # each exactly once: delivered or handed back


def test_an_error_from_deliver_propagates_and_closes_every_connection(raw, objects):
    server = raw()
    lean = _lean(server)

    def deliver(key: str, body: CheckedRead) -> None:
        raise OSError(28, "No space left on device")

    items = ((f"s3://bkt/{key}", len(body), key) for key, body in sorted(objects.items()))
    with pytest.raises(OSError, match="No space left"):
        get_many(lean, items, deliver, connections=4)


def test_a_spoiled_read_in_deliver_is_spent(raw, objects):
    server = raw()
    lean = _lean(server)

    def deliver(key: str, body: CheckedRead) -> None:
        raise ShortRead(f"short read: {key}")

    items = [(f"s3://bkt/{key}", len(objects[key]), key) for key in sorted(objects)[:3]]
    missed = get_many(lean, iter(items), deliver, connections=2)
    assert sorted(missed.spent) == sorted(objects)[:3] and missed.other == []


def test_stage_sends_small_objects_multiplexed_and_their_misses_to_the_threads(
    raw, objects, tmp_path: Path
):
    """A channel of small and large objects from a server that closes every connection without
    notice: the small ones multiplexed, the large one on the threads meanwhile; a 503, a body
    longer than its Content-Length and a spoiled one are fetched again on the threads (the server
    answers them right the second time) and the tree comes out whole."""
    objects["o/large.bin"] = bytes(range(256)) * 1024  # 256 KiB: over small_size below
    server = raw(close="silent", once=True)
    keys = sorted(objects)
    server.behaviour.update({keys[0]: "503", keys[1]: "extra", keys[2]: "flip"})
    entries = [
        Entry(f"s3://bkt/{k}", k[2:], len(v), hashlib.md5(v).hexdigest())
        for k, v in sorted(objects.items())
    ]
    options = StageOptions(
        endpoint_url=server.endpoint,
        threads=4,
        backoff=0.01,
        small_size=64 * 1024,
    )
    result = stage(entries, tmp_path / "d", options=options, log=logging.getLogger("test.data"))
    assert result.fetched == len(objects)
    assert tree(tmp_path / "d") == {k[2:]: v for k, v in objects.items()}
    assert server.requests.count("o/large.bin") == 1
    for key in keys[:3]:
        assert server.requests.count(key) == 2  # the miss, then the threads' GET
