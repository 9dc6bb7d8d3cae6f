"""``load_job``: the one reader of the job (spec or config files, the settings, the environment).

The top of agent.job: it reads the settings (agent.settings), the job from a spec
(agent.job.spec) or from SageMaker's config files (agent.job.files), compiles every metric
regex and finds the cluster identity (agent.distributed.identity), so whatever is wrong with
the job fails here, before code, packages or data are fetched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from agent.distributed.identity import identify
from agent.job.files import job_from_config_files
from agent.job.shapes import Job, Layout, MetricDefinition
from agent.job.spec import job_from_spec, parse_definitions
from agent.settings import read_settings

__all__ = ["load_job"]


def load_job(env: Mapping[str, str], job_arg: str | None = None) -> Job:
    """Read the job once: from ``job_arg`` (a path or inline JSON), else TORCHBAY_JOB, else the
    config files.

    The job's metric definitions are the spec's plus those of TORCHBAY_METRIC_DEFINITIONS whose
    names the spec does not define, each regex compiled here. Host discovery runs here, once
    (agent.distributed.identity): ``job.cluster`` is the job's only notion of the cluster and
    ``job.resource`` (current host, hosts, interface) agrees with it.

    Raises JobSpecError (a bad spec field, naming the key and the file) or ConfigError (a bad
    config file, setting or metric regex).
    """
    settings = read_settings(env)
    layout = Layout(Path(settings.general.root))
    origin = "--job" if job_arg else "TORCHBAY_JOB"
    job_arg = job_arg or settings.general.job
    if job_arg:
        job = job_from_spec(job_arg, origin, layout, settings, env)
    else:
        job = job_from_config_files(layout, settings, env)
    job = dataclasses.replace(job, metric_definitions=_metric_definitions(job))
    return identify(job)


def _metric_definitions(job: Job) -> tuple[MetricDefinition, ...]:
    """The job's definitions plus those of the setting whose names the job does not define."""
    names = {d.name for d in job.metric_definitions}
    extra = parse_definitions(job.settings.telemetry.metric_definitions)
    return job.metric_definitions + tuple(d for d in extra if d.name not in names)
