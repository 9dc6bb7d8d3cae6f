"""Our launch plans, run as they are (no train agent) in two network namespaces: 2 hosts x 2
processes."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from agent.distributed import build_plan, discover
from agent.environment import EntryPoint
from tests.distributed.helpers import make_job

SCRIPT = Path(__file__).with_name("ddp_script.py")
REPO = Path(__file__).resolve().parents[2]


def _plans(tmp_path: Path, count: int, **kwargs):
    plans = []
    for index in range(1, count + 1):
        job = make_job(
            tmp_path / f"h{index}",
            hosts=tuple(f"algo-{i}" for i in range(1, count + 1)),
            current=f"algo-{index}",
            hyperparameters={"sagemaker_torch_distributed_enabled": "true"},
            settings_env={
                "TORCHBAY_NPROC_PER_NODE": "2",
                "TORCHBAY_SOCKET_IFNAME": "eth0",
                "TORCHBAY_MASTER_PORT": "29533",
                **kwargs,
            },
        )
        entry = EntryPoint(kind="script", name=SCRIPT.name, path=SCRIPT, code_dir=SCRIPT.parent)
        plans.append(build_plan(job, entry, [], discover(job)))
    return plans


def _env(plan, **extra) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        **plan.env,
        **extra,
    }


def _rank_lines(plan, pattern: str) -> list[str]:
    found = []
    for path in sorted(plan.torchrun_log_dir.glob("*/attempt_*/*/stdout.log")):
        found += [line for line in path.read_text().splitlines() if re.search(pattern, line)]
    return found


@pytest.mark.timeout(300)
def test_two_hosts_two_processes_all_reduce(tmp_path, netns_cluster):
    cluster = netns_cluster(2)
    plans = _plans(tmp_path, 2)
    procs = [
        cluster.popen(i + 1, plan.argv, env=_env(plan), log=tmp_path / f"h{i + 1}.log")
        for i, plan in enumerate(plans)
    ]
    codes = [proc.wait(240) for proc in procs]
    logs = "\n".join((tmp_path / f"h{i}.log").read_text() for i in (1, 2))
    assert codes == [0, 0], logs
    lines = _rank_lines(plans[0], "ALLREDUCE") + _rank_lines(plans[1], "ALLREDUCE")
    ranks = sorted(int(re.search(r"rank=(\d)", line).group(1)) for line in lines)
    assert ranks == [0, 1, 2, 3], lines
    assert all("world=4 sum=10" in line for line in lines), lines
    assert [p.rank_base for p in plans] == [0, 2]


@pytest.mark.timeout(300)
def test_killed_host_fails_the_other_within_the_bound(tmp_path, netns_cluster):
    from agent.distributed import first_failure

    cluster = netns_cluster(2)
    plans = _plans(tmp_path, 2)
    procs = [
        cluster.popen(
            i + 1, plan.argv, env=_env(plan, DDP_LOOP_SECONDS="200"), log=tmp_path / f"h{i + 1}.log"
        )
        for i, plan in enumerate(plans)
    ]
    deadline = time.monotonic() + 200
    while len(_rank_lines(plans[0], "ALLREDUCE")) < 2 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), (tmp_path / "h1.log").read_text()
        time.sleep(0.2)
    assert len(_rank_lines(plans[0], "ALLREDUCE")) == 2
    cluster.kill_host(2)
    killed = time.monotonic()
    code = procs[0].wait(120)
    assert code != 0
    assert time.monotonic() - killed < 90
    message = first_failure(plans[0])
    assert message and message.startswith("rank ") and "on host algo-1 failed first:" in message, (
        message
    )
