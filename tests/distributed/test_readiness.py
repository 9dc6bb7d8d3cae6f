"""wait_for_hosts / wait_until_ready: names that resolve, a master that starts listening late, the
bound."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from agent.distributed import wait_for_hosts
from agent.distributed.readiness import wait_until_ready
from agent.errors import DistributedError
from tests.conftest import free_port
from tests.distributed.helpers import make_job

LOG = logging.getLogger("test.readiness")


def test_resolving_hosts_return_at_once():
    assert wait_until_ready(["localhost", "127.0.0.1"], master=None, timeout=10, log=LOG) < 5


def test_missing_host_fails_at_the_bound_naming_it(caplog):
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger=LOG.name), pytest.raises(DistributedError) as err:
        wait_until_ready(
            ["localhost", "never-resolves.invalid"],
            master=None,
            timeout=1.5,
            log=LOG,
            progress_every=0.3,
        )
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 15
    assert "never-resolves.invalid (does not resolve)" in str(err.value)
    assert "localhost" not in str(err.value).split(":", 1)[1].split(";")[0]
    assert "TORCHBAY_HOST_WAIT_TIMEOUT" in str(err.value)
    assert err.value.exit_code == 68
    assert any("never-resolves.invalid" in r.getMessage() for r in caplog.records), (
        "no progress line"
    )


def test_worker_waits_for_a_master_that_listens_late():
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def _listen_later() -> None:
        time.sleep(1.0)
        server.bind(("127.0.0.1", port))
        server.listen()

    thread = threading.Thread(target=_listen_later)
    thread.start()
    try:
        waited = wait_until_ready(["127.0.0.1"], master=("127.0.0.1", port), timeout=60, log=LOG)
        assert waited >= 0.9
    finally:
        thread.join()
        server.close()


def test_master_that_never_listens_is_named():
    port = free_port()
    with pytest.raises(
        DistributedError, match=rf"127.0.0.1:{port} \(master does not accept connections"
    ):
        wait_until_ready(["127.0.0.1"], master=("127.0.0.1", port), timeout=1.0, log=LOG)


def test_wait_for_hosts_uses_the_setting_and_skips_one_host(tmp_path):
    wait_for_hosts(
        make_job(tmp_path, hosts=("never-resolves.invalid",), current="never-resolves.invalid"),
        log=LOG,
    )
    job = make_job(
        tmp_path,
        hosts=("localhost", "never-resolves.invalid"),
        current="localhost",
        settings_env={"TORCHBAY_HOST_WAIT_TIMEOUT": "1"},
    )
    with pytest.raises(DistributedError, match="after 1 s: never-resolves.invalid"):
        wait_for_hosts(job, log=LOG)


def test_torchrun_workers_do_not_wait_for_the_master_port(tmp_path):
    """torchrun's rendezvous waits for the master itself; a one-process-per-host worker waits
    here."""
    port = str(free_port())
    base = {"TORCHBAY_HOST_WAIT_TIMEOUT": "1", "TORCHBAY_MASTER_PORT": port}
    job = make_job(
        tmp_path,
        hosts=("127.0.0.1", "localhost"),
        current="localhost",
        settings_env={**base, "TORCHBAY_TORCHRUN": "true"},
    )
    wait_for_hosts(job, log=LOG)
    job = make_job(
        tmp_path, hosts=("127.0.0.1", "localhost"), current="localhost", settings_env=base
    )
    with pytest.raises(DistributedError, match=f"127.0.0.1:{port} \\(master does not accept"):
        wait_for_hosts(job, log=LOG)
