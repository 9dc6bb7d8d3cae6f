"""A real Slurm cluster (Debian's slurm-wlm and munge, one slurmd per namespace host): the job is
started with ``srun --nodes=2 --ntasks-per-node=1 torchbay train --job ...``, so every SLURM_*
variable comes from Slurm."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multihost.slurm import SlurmCluster, slurm_missing
from tests.multihost.test_identity import _job, agent_env, check_identity, results


@pytest.fixture
def slurm(tmp_path, netns_cluster, root_s3):
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    net = netns_cluster(
        2, hostnames=["node1", "node2"], names="all"
    )  # a cluster's hosts file lists the nodes
    s3 = root_s3(net)
    cluster = SlurmCluster(net, tmp_path / "slurm").open()
    try:
        yield cluster, s3
    finally:
        cluster.close()


@pytest.mark.timeout(200)
def test_srun_two_nodes_one_identity(tmp_path, slurm):
    cluster, s3 = slurm
    spec, _, _ = _job(tmp_path, s3)
    env = {**agent_env(tmp_path, s3, "unused"), **cluster.env}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    torchbay = Path(sys.executable).with_name("torchbay")
    program = [str(torchbay)] if torchbay.exists() else [sys.executable, "-m", "agent"]
    # one root per node on this one machine: the node's name picks it
    step = (
        f"TORCHBAY_ROOT={shlex.quote(str(tmp_path))}/$SLURMD_NODENAME/ml exec "
        f"{' '.join(shlex.quote(p) for p in program)} train --job {shlex.quote(str(spec))}"
    )
    log = tmp_path / "srun.log"
    with open(log, "wb") as out:
        code = subprocess.run(
            cluster.srun_command("sh", "-c", step),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=150,
            check=False,
        ).returncode
    text = log.read_text()
    assert code == 0, text + cluster.logs()
    found = results([text])
    check_identity(found, [text], ["node1", "node2"])
    assert "from slurm" in text or "names from Slurm node names" in text, text
