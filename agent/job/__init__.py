"""The job contract, parsed once into frozen, typed objects.

Layers, bottom to top (each imports only those below it):

- ``agent.job.shapes``: the frozen shapes (Layout, Channel, Resource, MetricDefinition, Job);
- ``agent.job.files``: SageMaker's config files (hyperparameters.json, inputdataconfig.json,
  resourceconfig.json), read and written (``write_config_files``);
- ``agent.job.spec``: the CreateTrainingJob-shaped job spec, validated and read;
- ``agent.job.load``: ``load_job``, the one reader of the job, the settings and the environment.

Everything a caller needs is importable from ``agent.job``.
"""

from __future__ import annotations

from agent.job.files import write_config_files
from agent.job.load import load_job
from agent.job.shapes import (
    Channel,
    Job,
    Layout,
    MetricDefinition,
    Resource,
    frozen_map,
    resource_config,
)

__all__ = [
    "Channel",
    "Job",
    "Layout",
    "MetricDefinition",
    "Resource",
    "frozen_map",
    "load_job",
    "resource_config",
    "write_config_files",
]
