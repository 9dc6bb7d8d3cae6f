"""The identity exchange over real sockets on 127.0.0.1: the table, failures passed on, lost
peers."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest

from agent.distributed.cluster import Cluster
from agent.distributed.exchange import Exchange
from agent.errors import DistributedError

LOG = logging.getLogger("test-exchange")


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cluster(rank: int, count: int = 3) -> Cluster:
    hosts = tuple(f"algo-{i}" for i in range(1, count + 1))
    return Cluster(
        source="torchrun",
        hosts=hosts,
        node_rank=rank,
        nnodes=count,
        master_addr="127.0.0.1",
        master_port=29500,
        current_host=hosts[rank],
    )


class _Stops:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, text: str) -> None:
        self.reasons.append(text)
        self.event.set()


def _start(
    rank: int, port: int, count: int = 3, timeout: float = 10.0, job: str = "j"
) -> tuple[Exchange, _Stops]:
    stops = _Stops()
    return Exchange(
        _cluster(rank, count),
        job_name=job,
        port=port,
        timeout=timeout,
        log=LOG,
        on_peer_failure=stops,
    ).start(), stops


def test_every_host_gets_the_same_table():
    port = _port()
    # workers first: they retry until the master listens
    workers = [_start(r, port) for r in (1, 2)]
    time.sleep(0.2)
    master, _ = _start(0, port)
    tables = [ex.wait_table() for ex, _ in [(master, None), *workers]]
    assert tables[0] == tables[1] == tables[2]
    assert set(tables[0]) == {"algo-1", "algo-2", "algo-3"}
    assert all(addr == "127.0.0.1" for addr in tables[0].values())
    for ex, _ in workers:
        ex.close(0, None)
    master.close(0, None)
    assert master.peer_failure is None and all(ex.peer_failure is None for ex, _ in workers)


def test_a_failing_worker_stops_the_master_and_the_other_workers():
    port = _port()
    master, master_stops = _start(0, port)
    (w1, s1), (w2, s2) = _start(1, port), _start(2, port)
    for ex in (master, w1, w2):
        ex.wait_table()
    w1.close(1, "ValueError: bad shard\nmore")
    assert master_stops.event.wait(5) and s2.event.wait(5)
    assert master.peer_failure == "host algo-2 failed: ValueError: bad shard more"
    assert w2.peer_failure == "host algo-2 failed: ValueError: bad shard more"
    assert not s1.reasons
    master.close(143, "stopped")
    w2.close(143, "stopped")


def test_a_master_that_fails_before_a_worker_connects_still_tells_it():
    port = _port()
    master, _ = _start(0, port, count=2)
    closer = threading.Thread(
        target=master.close, args=(1, "ModuleNotFoundError: No module named 'x'")
    )
    closer.start()
    time.sleep(0.3)
    worker, stops = _start(1, port, count=2)
    with pytest.raises(DistributedError, match="host algo-1 failed: ModuleNotFoundError"):
        worker.wait_table()
    assert stops.event.is_set()
    closer.join(15)


def test_a_peer_that_vanishes_is_a_failure():
    port = _port()
    master, stops = _start(0, port, count=2)
    worker, _ = _start(1, port, count=2)
    master.wait_table()
    worker.wait_table()
    with worker._lock:  # the worker's process dies: its socket closes without a word
        conn = worker._conns["algo-1"]
    worker._stopped.set()
    conn.sock.shutdown(socket.SHUT_RDWR)
    assert stops.event.wait(5)
    assert "host algo-2 lost its connection" in master.peer_failure
    master.close(143, None)


def test_a_missing_host_is_named_at_the_bound():
    port = _port()
    master, _ = _start(0, port, count=2, timeout=0.5)
    with pytest.raises(
        DistributedError, match=r"hosts not ready after 0.5 s: algo-2 \(does not resolve\)"
    ):
        master.wait_table()
    master.close(68, None)


def test_a_worker_without_a_master_fails_at_the_bound_naming_it():
    worker, _ = _start(1, _port(), count=2, timeout=0.5)
    with pytest.raises(
        DistributedError, match="the master algo-1 .* did not answer the identity exchange"
    ):
        worker.wait_table()


def test_a_stranger_is_turned_away():
    port = _port()
    master, stops = _start(0, port, count=2, timeout=1.0, job="mine")
    other, _ = _start(1, port, count=2, timeout=1.0, job="theirs")
    with pytest.raises(DistributedError):
        other.wait_table()
    assert not stops.reasons
    master.close(0, None)


def test_a_worker_whose_master_waits_for_another_host_says_so():
    port = _port()
    master, _ = _start(0, port, count=3, timeout=0.5)
    worker, _ = _start(1, port, count=3, timeout=0.5)
    with pytest.raises(DistributedError, match=r"the master algo-1 has not heard from every host"):
        worker.wait_table()
    with pytest.raises(
        DistributedError, match=r"algo-3 \((does not resolve|did not report to the master)\)"
    ):
        master.wait_table()
    worker.close(68, None)
    master.close(68, None)


class _LatePeerThreads(Exchange):
    """A master whose per-peer threads start only after ``HOLD`` peers were accepted: the order a
    loaded host can run them in (the accept loop takes the next queued peer first)."""

    HOLD = 2
    held: list[Callable[[], None]]

    def _thread(self, target: Callable[[], None], name: str) -> None:
        if name != "exchange-peer":
            super()._thread(target, name)
            return
        self.held.append(target)
        if len(self.held) == self.HOLD:
            for held in self.held:
                super()._thread(held, name)


def test_each_accepted_peer_is_served_on_its_own_connection():
    port = _port()
    master = _LatePeerThreads(
        _cluster(0), job_name="j", port=port, timeout=10.0, log=LOG, on_peer_failure=_Stops()
    )
    master.held = []
    master.start()
    first, _ = _start(1, port)
    deadline = time.monotonic() + 5
    while not master.held and time.monotonic() < deadline:  # the first peer is accepted
        time.sleep(0.01)
    second, _ = _start(2, port)
    tables = [ex.wait_table() for ex in (master, first, second)]
    assert tables[0] == tables[1] == tables[2]
    assert set(tables[0]) == {"algo-1", "algo-2", "algo-3"}
    for ex in (first, second, master):
        ex.close(0, None)
