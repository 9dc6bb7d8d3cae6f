"""The identity exchange: a small TCP conversation between each host's agent and the master's.

At start every worker agent connects to the master at ``master_addr:TORCHBAY_EXCHANGE_PORT``
(29499 by default) and says who it is; once every host has reported, the master answers each
with the table of names and addresses (as the master saw them), so every host can make every name
of ``SM_HOSTS`` resolve (agent/distributed/hostsfile.py). The connection then stays open for the
whole job and carries the end of it: ``done`` or ``failed`` with the reason, and a ping every few
seconds. A host whose agent fails, or whose connection drops without a ``done``, stops every other
host within seconds, with a reason naming it, instead of leaving them in a rendezvous until its
timeout.

One JSON object per line, each under 4 KiB::

    worker -> master  {"hello": 1, "job": NAME, "host": "algo-2", "rank": 1}
    master -> worker  {"table": {"algo-1": "198.18.0.11", "algo-2": "198.18.0.12"}}
    either way        {"ping": 1} | {"done": HOST} | {"failed": HOST, "reason": TEXT}

stdlib sockets and daemon threads only; every wait is bounded.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.distributed.cluster import Cluster
from agent.errors import DistributedError

__all__ = ["DEFAULT_PORT", "LOST_AFTER", "PING_EVERY", "Exchange"]

DEFAULT_PORT = 29499
PING_EVERY = 2.0  # seconds between pings on an idle connection
# seconds of silence after which a peer counts as gone (a host that froze or lost its link)
LOST_AFTER = 15.0
# seconds a failing host waits to hand its failure to peers that are still connecting
_LINGER = 10.0
_MAX_LINE = 4096
_REASON_MAX = 400


class _Conn:
    """One connection, one line at a time; writes are serialised by a lock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._buffer = b""
        sock.settimeout(LOST_AFTER)

    def send(self, message: dict[str, Any]) -> bool:
        data = (json.dumps(message, separators=(",", ":"))[: _MAX_LINE - 1] + "\n").encode()
        with self._lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def receive(self) -> dict[str, Any] | None:
        """The next message; None at EOF, on an error or after LOST_AFTER seconds of silence."""
        while b"\n" not in self._buffer:
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return None
            if not chunk or len(self._buffer) > _MAX_LINE:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Exchange:
    """This host's side of the exchange. ``start`` returns at once; ``wait_table`` blocks until the
    table is known; ``close`` tells the peers how this host ended and returns the peer failure, if
    any."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        job_name: str,
        port: int,
        timeout: float,
        log: logging.Logger,
        on_peer_failure: Callable[[str], None],
    ) -> None:
        self.cluster = cluster
        self.job_name = job_name
        self.port = port
        self.timeout = timeout
        self.log = log
        self._on_peer_failure = on_peer_failure
        self._table: dict[str, str] = {}
        self._ready = threading.Event()
        self._lock = threading.Lock()
        # host -> connection (the master: every worker; a worker: the master)
        self._conns: dict[str, _Conn] = {}
        self._done: set[str] = set()
        self._told: set[str] = set()  # late peers the master told how it ended
        self._closing: dict[str, Any] | None = None  # this host's last word, once it is ending
        self._server: socket.socket | None = None
        self._connected = threading.Event()
        self.peer_failure: str | None = None
        self.error: str | None = None  # why the exchange could not finish (bind, connect, bad peer)
        self._stopped = threading.Event()

    # --- starting ---------------------------------------------------------------------------------
    def start(self) -> Exchange:
        if self.cluster.is_master:
            try:
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                server.bind(("0.0.0.0", self.port))
                server.listen(max(16, self.cluster.nnodes))
            except OSError as err:
                self._fail_start(
                    f"the master cannot listen on TCP port {self.port} for the identity exchange "
                    f"({err}); free the port or set TORCHBAY_EXCHANGE_PORT"
                )
                return self
            self._server = server
            self._connected.set()
            if self.cluster.nnodes == 1:
                self._finish_table()
            self._thread(self._accept_loop, "exchange-accept")
        else:
            self._thread(self._connect_loop, "exchange-connect")
        self._thread(self._ping_loop, "exchange-ping")
        return self

    def _thread(self, target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def _fail_start(self, error: str) -> None:
        self.error = error
        self._ready.set()

    # --- the master -------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopped.is_set():
            try:
                sock, peer = self._server.accept()
            except OSError:
                return
            # Bound now: a lambda would read sock when the thread runs, by which time the loop
            # may have accepted the next peer (two threads on one socket, the first peer unserved).
            self._thread(functools.partial(self._serve, _Conn(sock), peer[0]), "exchange-peer")

    def _serve(self, conn: _Conn, address: str) -> None:
        hello = conn.receive()
        hosts = self.cluster.hosts
        if not hello or hello.get("job") != self.job_name or hello.get("host") not in hosts[1:]:
            conn.send(
                {
                    "failed": self.cluster.current_host,
                    "reason": f"the master of job {self.job_name!r} does not expect {hello!r}",
                }
            )
            self.log.warning("identity exchange: ignored a connection from %s: %r", address, hello)
            conn.close()
            return
        host = str(hello["host"])
        own = conn.sock.getsockname()[0]
        with self._lock:
            closing = self._closing
            if closing is None:
                self._conns[host] = conn
                self._table[host] = address
                self._table.setdefault(hosts[0], own)
        if closing is not None:  # this host already ended: tell the late peer at once
            conn.send(closing)
            with self._lock:
                self._told.add(host)
            conn.close()
            return
        self._maybe_finish_table()
        self._read_loop(host, conn)

    def _maybe_finish_table(self) -> None:
        with self._lock:
            complete = (
                all(h in self._table for h in self.cluster.hosts) and not self._ready.is_set()
            )
        if complete:
            self._finish_table()

    def _finish_table(self) -> None:
        if self.cluster.nnodes == 1:
            self._table.setdefault(self.cluster.hosts[0], "")
        message = {"table": dict(self._table)}
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            conn.send(message)
        self._ready.set()

    # --- a worker ---------------------------------------------------------------------------------
    def _connect_loop(self) -> None:
        master, host = self.cluster.hosts[0], self.cluster.master_addr
        deadline = time.monotonic() + self.timeout
        last = ""
        while not self._stopped.is_set():
            try:
                sock = socket.create_connection((host, self.port), timeout=2.0)
                break
            except OSError as err:
                last = str(err)
            if time.monotonic() >= deadline:
                self._fail_start(self._master_missing(last))
                self._connected.set()
                return
            time.sleep(0.05)
        else:
            return
        conn = _Conn(sock)
        conn.send(
            {
                "hello": 1,
                "job": self.job_name,
                "host": self.cluster.current_host,
                "rank": self.cluster.node_rank,
            }
        )
        with self._lock:
            self._conns[master] = conn
        self._connected.set()
        self._read_loop(master, conn)

    # --- both -------------------------------------------------------------------------------------
    def _read_loop(self, host: str, conn: _Conn) -> None:
        while True:
            message = conn.receive()
            if message is None:
                with self._lock:
                    gone = host not in self._done and self._closing is None
                if gone:
                    self._peer_failed(
                        host,
                        f"host {host} lost its connection to {self.cluster.current_host} without "
                        "finishing (its agent died, or the host went down)",
                    )
                conn.close()
                return
            if "table" in message and not self.cluster.is_master:
                table = message["table"]
                if isinstance(table, dict):
                    self._table = {str(k): str(v) for k, v in table.items()}
                    self._ready.set()
            elif "done" in message:
                with self._lock:
                    self._done.add(host)
                conn.sock.settimeout(None)
            elif "failed" in message:
                failed = str(message.get("failed"))
                reason = str(message.get("reason") or "no reason given")[:_REASON_MAX]
                with self._lock:
                    self._done.add(host)
                self._peer_failed(failed, f"host {failed} failed: {reason}")
                conn.close()
                return

    def _master_missing(self, last: str) -> str:
        return (
            f"the master {self.cluster.hosts[0]} ({self.cluster.master_addr}:{self.port}) did not "
            "answer the "
            f"identity exchange within {self.timeout:g} s (last error: {last or 'none'}); check "
            "that every host of "
            "the job was started and that the master's address resolves, or raise "
            "TORCHBAY_HOST_WAIT_TIMEOUT"
        )

    def _peer_failed(self, host: str, text: str) -> None:
        with self._lock:
            first = self.peer_failure is None and self._closing is None
            if first:
                self.peer_failure = text
            others = (
                [c for h, c in self._conns.items() if h != host] if self.cluster.is_master else []
            )
        if not first:
            return
        self.log.error("%s; stopping this host (%s)", text, self.cluster.current_host)
        for conn in others:  # the master passes a worker's failure on to every other worker
            conn.send({"failed": host, "reason": text.split(": ", 1)[-1]})
        if not self._ready.is_set():
            self.error = text
            self._ready.set()
        self._on_peer_failure(text)

    def _ping_loop(self) -> None:
        while not self._stopped.wait(PING_EVERY):
            with self._lock:
                conns = [c for h, c in self._conns.items() if h not in self._done]
            for conn in conns:
                conn.send({"ping": 1})

    # --- the public surface -----------------------------------------------------------------------
    def wait_table(self, should_stop: Callable[[], bool] = lambda: False) -> dict[str, str]:
        """The name -> address table once every host has reported; DistributedError when a host
        failed, did not report within the timeout, or the exchange could not start."""
        deadline = time.monotonic() + self.timeout
        while not self._ready.wait(0.05):
            if should_stop():
                return {}
            if time.monotonic() >= deadline:
                hint = (
                    "; every host must be told which one it is (TORCHBAY_CURRENT_HOST on each host)"
                    if self.cluster.source == "spec"
                    else ""
                )
                if not self.cluster.is_master:
                    if not self._connected.is_set():
                        raise DistributedError(self._master_missing("no answer"))
                    raise DistributedError(
                        f"hosts not ready after {self.timeout:g} s: the master "
                        f"{self.cluster.hosts[0]} has not heard "
                        f"from every host of {list(self.cluster.hosts)}; check that every host of "
                        "the job was started"
                        f"{hint}, or raise TORCHBAY_HOST_WAIT_TIMEOUT"
                    )
                with self._lock:
                    missing = [h for h in self.cluster.hosts[1:] if h not in self._table]
                raise DistributedError(
                    f"hosts not ready after {self.timeout:g} s: "
                    f"{', '.join(_missing(h) for h in missing)}; check "
                    f"the host names and that every host of the job was started{hint}, or raise "
                    "TORCHBAY_HOST_WAIT_TIMEOUT"
                )
        if self.error:
            raise DistributedError(self.error)
        return dict(self._table)

    def close(self, exit_code: int | None, reason: str | None) -> None:
        """Tell the peers how this host ended (``done``, or ``failed`` with ``reason``), then
        stop."""
        me = self.cluster.current_host
        failed = exit_code not in (0, None) and self.peer_failure is None
        if failed:
            first = (reason or f"exit code {exit_code}").strip().splitlines()
            message: dict[str, Any] = {"failed": me, "reason": " ".join(first[:2])[:_REASON_MAX]}
        else:
            message = {"done": me}
        with self._lock:
            self._closing = message
            conns = list(self._conns.values())
        if failed and not self.cluster.is_master:
            self._connected.wait(
                min(_LINGER, self.timeout)
            )  # a worker still connecting hands over its failure first
            with self._lock:
                conns = list(self._conns.values())
        for conn in conns:
            conn.send(message)
        if (
            failed and self.cluster.is_master
        ):  # workers still on their way get the failure as they connect
            deadline = time.monotonic() + min(_LINGER, self.timeout)
            while time.monotonic() < deadline:
                with self._lock:
                    if all(h in self._conns or h in self._told for h in self.cluster.hosts[1:]):
                        break
                time.sleep(0.05)
        self._stopped.set()
        if self._server is not None:
            try:
                self._server.close()
            except OSError:
                pass
        for conn in conns:
            conn.close()


def _missing(host: str) -> str:
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return f"{host} (does not resolve)"
    return f"{host} (did not report to the master)"
