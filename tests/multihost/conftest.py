"""Fixtures for multi-host tests: network namespaces (one per host) and an S3 server they can
reach."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import DUMMY_CREDS, S3Server, free_port
from tests.multihost.netns import NetnsCluster, netns_permitted


@pytest.fixture(scope="session")
def netns_reason() -> str | None:
    return netns_permitted()


@pytest.fixture
def netns_cluster(netns_reason) -> Iterator[Callable[..., NetnsCluster]]:
    """A factory: ``netns_cluster(2)`` builds two host namespaces, all removed after the test."""
    if netns_reason:
        pytest.skip(netns_reason)
    made: list[NetnsCluster] = []

    def _make(count: int = 2, **kwargs) -> NetnsCluster:
        cluster = NetnsCluster(count, **kwargs)
        made.append(cluster)
        return cluster.open()

    try:
        yield _make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture
def root_s3(tmp_path: Path) -> Iterator[Callable[[NetnsCluster], S3Server]]:
    """A factory: a moto server on a cluster's root address (reachable from every host
    namespace)."""
    servers: list[S3Server] = []

    def _start(cluster: NetnsCluster) -> S3Server:
        server = S3Server(
            free_port(),
            tmp_path / f"moto-{cluster.tag}.log",
            host=cluster.root_addr,
            env=dict(DUMMY_CREDS, PATH="/usr/bin:/bin"),
            ready_timeout=60,
        )
        servers.append(server)
        server.start()
        return server

    try:
        yield _start
    finally:
        for server in servers:
            server.stop()
