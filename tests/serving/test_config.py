"""Workers, torch threads and GPUs: the arithmetic resolve_config and assign_gpu do."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.serving.config import assign_gpu, resolve_config
from agent.settings import read_settings


def _config(env: dict, *, cores: int, gpus: int = 0, **overrides):
    return resolve_config(
        read_settings(dict(env, TORCHBAY_ROOT="/tmp/tb-root")), overrides, cores=cores, gpus=gpus
    )


def test_cpu_defaults_one_worker_per_core_one_thread_each() -> None:
    config = _config({}, cores=8)
    assert (config.workers, config.torch_threads, config.gpus, config.preload) == (8, 1, 0, True)


@pytest.mark.parametrize(
    "cores, gpus, workers, threads",
    [
        (16, 1, 4, 4),  # the H200 of the issue: 4 workers x 4 threads, not 1 x 16
        (16, 8, 16, 1),  # 2 per GPU: cores // gpus
        (96, 8, 32, 3),  # capped at 4 per GPU
        (4, 8, 8, 1),  # fewer cores than GPUs: still one worker per GPU
        (2, 1, 2, 1),
    ],
)
def test_gpu_defaults_several_workers_per_gpu_within_the_cores(
    cores: int, gpus: int, workers: int, threads: int
) -> None:
    config = _config({}, cores=cores, gpus=gpus)
    assert (config.workers, config.torch_threads) == (workers, threads)
    assert config.workers % gpus == 0
    assert config.workers * config.torch_threads <= max(cores, config.workers)
    assert config.preload is False  # CUDA does not survive fork: each GPU worker loads its own copy


def test_workers_per_gpu_setting_and_flag() -> None:
    config = _config({"TORCHBAY_SERVE_WORKERS_PER_GPU": "2"}, cores=16, gpus=2)
    assert (config.workers, config.torch_threads) == (4, 4)
    config = _config(
        {"TORCHBAY_SERVE_WORKERS_PER_GPU": "2"}, cores=16, gpus=2, serve_workers_per_gpu=3
    )
    assert (config.workers, config.torch_threads) == (6, 2)
    config = _config({"TORCHBAY_SERVE_WORKERS_PER_GPU": "2"}, cores=16, gpus=0)
    assert config.workers == 16  # no GPU: the per-GPU setting does not apply


def test_explicit_workers_and_threads_win() -> None:
    config = _config(
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "3", "TORCHBAY_SERVE_WORKERS_PER_GPU": "4"},
        cores=16,
        gpus=2,
    )
    assert (config.workers, config.torch_threads) == (3, 5)
    config = _config(
        {"SAGEMAKER_MODEL_SERVER_WORKERS": "3", "TORCHBAY_SERVE_TORCH_THREADS": "16"},
        cores=16,
        gpus=1,
    )
    assert (config.workers, config.torch_threads) == (3, 16)


def test_workers_per_gpu_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="TORCHBAY_SERVE_WORKERS_PER_GPU"):
        read_settings({"TORCHBAY_SERVE_WORKERS_PER_GPU": "0"})


def test_assign_gpu_round_robin_and_refills_a_dead_workers_gpu() -> None:
    taken: list = []
    for _ in range(8):
        taken.append(assign_gpu(taken, 3))
    assert taken == [0, 1, 2, 0, 1, 2, 0, 1]
    del taken[4]  # the second worker on GPU 1 died: its replacement goes to GPU 1
    assert assign_gpu(taken, 3) == 1
    assert assign_gpu([None, 7, 0], 2) == 1  # unknown entries ignored
    with pytest.raises(ConfigError):
        assign_gpu([], 0)
