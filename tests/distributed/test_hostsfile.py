"""agent/distributed/hostsfile.py: names that do not resolve are added, once, between markers."""

from __future__ import annotations

import logging

from agent.distributed.hostsfile import ensure_resolvable

LOG = logging.getLogger("test-hostsfile")


def test_missing_names_are_added_and_replaced_on_the_next_job(tmp_path, caplog):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    names = ["localhost", "tb-no-such-host-1.invalid", "tb-no-such-host-2.invalid"]
    table = {"tb-no-such-host-1.invalid": "198.18.0.11", "tb-no-such-host-2.invalid": "198.18.0.12"}
    with caplog.at_level(logging.INFO, logger="test-hostsfile"):
        outcome = ensure_resolvable(names, table, job="j1", hosts_file=hosts, log=LOG)
    assert outcome["localhost"] == "resolves"
    assert outcome["tb-no-such-host-1.invalid"] == f"added to {hosts} as 198.18.0.11"
    assert hosts.read_text() == (
        "127.0.0.1 localhost\n# torchbay: hosts of job j1 (begin)\n"
        "198.18.0.11 tb-no-such-host-1.invalid\n198.18.0.12 tb-no-such-host-2.invalid\n"
        "# torchbay: end\n"
    )
    assert sum("host names:" in r.message for r in caplog.records) == 1
    ensure_resolvable(
        names[:2], {"tb-no-such-host-1.invalid": "198.18.0.21"}, job="j2", hosts_file=hosts, log=LOG
    )
    assert hosts.read_text() == (
        "127.0.0.1 localhost\n# torchbay: hosts of job j2 (begin)\n"
        "198.18.0.21 tb-no-such-host-1.invalid\n# torchbay: end\n"
    )


def test_a_file_that_may_not_be_written_is_one_warning(tmp_path, caplog):
    target = tmp_path / "no-dir" / "hosts"
    with caplog.at_level(logging.INFO, logger="test-hostsfile"):
        outcome = ensure_resolvable(
            ["tb-no-such-host.invalid"],
            {"tb-no-such-host.invalid": "198.18.0.11"},
            job="j",
            hosts_file=target,
            log=LOG,
        )
    assert outcome == {"tb-no-such-host.invalid": "does NOT resolve (address 198.18.0.11)"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "MASTER_ADDR=hosts[0]" in warnings[0].message
