"""Every tunable, declared once: name, environment variable, type, default, validator and help.

The README's settings table is printed by ``torchbay settings``, so it cannot drift from
this file. Values are read from an environment mapping exactly once, by
:func:`read_settings`, into a frozen :class:`Settings` object; nothing else reads the
environment for a setting.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError

__all__ = ["ALL_SETTINGS", "Setting", "Settings", "parse_bool", "read_settings"]


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` and ``0/false/no/off`` (any case); anything else is a ValueError."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def _positive(value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError("must be greater than 0")


def _non_negative(value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError("must be 0 or more")


@dataclass(frozen=True)
class Setting:
    """One tunable. ``env`` is its environment variable (a list: the first one set wins)."""

    name: str
    env: Sequence[str]
    type: Callable[[str], Any]
    default: Any
    help: str
    section: str
    validator: Callable[[Any], None] | None = None

    def parse(self, raw: str) -> Any:
        try:
            value = self.type(raw)
            if self.validator is not None:
                self.validator(value)
        except ValueError as err:
            raise ConfigError(
                f"setting {self.env[0]}={raw!r} is invalid: {err}; see `torchbay settings`"
            ) from err
        return value


def _s(
    name: str,
    env: Sequence[str] | str,
    type_: Callable[[str], Any],
    default: Any,
    help_: str,
    section: str,
    validator: Callable[[Any], None] | None = None,
) -> Setting:
    return Setting(
        name,
        (env,) if isinstance(env, str) else tuple(env),
        type_,
        default,
        help_,
        section,
        validator,
    )


def _opt_str(text: str) -> str | None:
    return text or None


# --- general ---------------------------------------------------------------------------------
_GENERAL = (
    _s(
        "root",
        ("TORCHBAY_ROOT", "SAGEMAKER_BASE_DIR"),
        str,
        "/opt/ml",
        "Root of the SageMaker layout (input/, model/, output/, code/, checkpoints/).",
        "general",
    ),
    _s(
        "job",
        "TORCHBAY_JOB",
        _opt_str,
        None,
        "The job spec: a path to a CreateTrainingJob-shaped JSON file, or the JSON itself.",
        "general",
    ),
    _s(
        "log_level",
        "TORCHBAY_LOG_LEVEL",
        str,
        "INFO",
        "The agent's log level (DEBUG, INFO, WARNING, ERROR).",
        "general",
    ),
    _s(
        "endpoint_url",
        ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"),
        _opt_str,
        None,
        "S3-compatible endpoint for every s3:// URI (the standard AWS settings).",
        "general",
    ),
)

# --- train lifecycle (issue 2) -----------------------------------------------------------------
_TRAIN = (
    _s(
        "grace_period",
        "TORCHBAY_GRACE_PERIOD",
        float,
        30.0,
        "Seconds between SIGTERM to the user's processes and SIGKILL.",
        "train",
        _positive,
    ),
    _s(
        "hosts",
        "TORCHBAY_HOSTS",
        _opt_str,
        None,
        "Comma-separated hosts of a job run from a spec (default algo-1..algo-N for InstanceCount "
        "N).",
        "train",
    ),
    _s(
        "current_host",
        "TORCHBAY_CURRENT_HOST",
        _opt_str,
        None,
        "This host's name among TORCHBAY_HOSTS (default the first host).",
        "train",
    ),
    _s(
        "network_interface",
        "TORCHBAY_NETWORK_INTERFACE",
        str,
        "eth0",
        "network_interface_name written to resourceconfig.json for a job run from a spec.",
        "train",
    ),
    _s(
        "pip_timeout",
        "TORCHBAY_PIP_TIMEOUT",
        float,
        1800.0,
        "Seconds `pip install` of the user's requirements may take before the job fails.",
        "train",
        _positive,
    ),
    _s(
        "upload_timeout",
        "TORCHBAY_UPLOAD_TIMEOUT",
        float,
        600.0,
        "Seconds the end-of-job uploads (model, outputs, checkpoints) may take.",
        "train",
        _positive,
    ),
    _s(
        "line_buffer",
        "TORCHBAY_LINE_BUFFER",
        parse_bool,
        True,
        "Start the user's command under coreutils `stdbuf -oL -eL`, so C-level stdio (NCCL, C++ "
        "extensions, "
        "awk) is line-buffered and a killed process loses no finished line; off, or where stdbuf is "
        ""
        ""
        "missing, "
        "only Python output is unbuffered (PYTHONUNBUFFERED=1).",
        "train",
    ),
)

# --- data agent (issue 3) ----------------------------------------------------------------------
_DATA = (
    _s(
        "data_threads",
        "TORCHBAY_DATA_THREADS",
        int,
        16,
        "File mode: parallel GETs per staging process.",
        "data",
        _positive,
    ),
    _s(
        "data_processes",
        "TORCHBAY_DATA_PROCESSES",
        int,
        0,
        "File mode: staging worker processes, each with its own S3 client (0: pick from the "
        "listing, up to one "
        "per core for many small objects).",
        "data",
        _non_negative,
    ),
    _s(
        "data_range_threshold",
        "TORCHBAY_DATA_RANGE_THRESHOLD",
        int,
        1024**3,
        "File mode: objects of this many bytes or more are fetched in parallel ranges (one stream "
        "each below).",
        "data",
        _positive,
    ),
    _s(
        "data_range_size",
        "TORCHBAY_DATA_RANGE_SIZE",
        int,
        64 * 1024**2,
        "File mode: bytes per ranged GET for objects at or above the range threshold.",
        "data",
        _positive,
    ),
    _s(
        "data_attempts",
        "TORCHBAY_DATA_ATTEMPTS",
        int,
        5,
        "Attempts per object (short reads, dropped connections, 5xx) before staging fails.",
        "data",
        _positive,
    ),
    _s(
        "data_progress_interval",
        "TORCHBAY_DATA_PROGRESS_INTERVAL",
        float,
        5.0,
        "Seconds between staging progress lines (files, bytes, rate, ETA).",
        "data",
        _positive,
    ),
    _s(
        "data_verify_md5",
        "TORCHBAY_DATA_VERIFY_MD5",
        parse_bool,
        True,
        "Check each whole-object download against its ETag when the ETag is a plain MD5.",
        "data",
    ),
    _s(
        "data_lean_get",
        "TORCHBAY_DATA_LEAN_GET",
        parse_bool,
        True,
        "File mode: whole-object GETs signed here and read over http.client (about a fifth of "
        "botocore's CPU per "
        "GET); anything unusual (an error, a redirect, a chunked body) falls back to boto3.",
        "data",
    ),
    _s(
        "data_read_size",
        "TORCHBAY_DATA_READ_SIZE",
        int,
        1024**2,
        "File mode: bytes per read of a large body into a reused buffer (1 MiB stays in cache; 4-16 "
        ""
        ""
        "MiB measured "
        "slower).",
        "data",
        _positive,
    ),
    _s(
        "data_md5_max_size",
        "TORCHBAY_DATA_MD5_MAX_SIZE",
        int,
        1024**3,
        "File mode, lean GETs: each body is checked by its byte count and by the full-object "
        "CRC32/SHA S3 returns; "
        "only when S3 returns none, objects up to this size are checked against a plain-MD5 ETag "
        "(MD5 costs "
        "~1.2 ms of CPU per MiB here, CRC32 ~0.15).",
        "data",
        _non_negative,
    ),
    _s(
        "data_large_size",
        "TORCHBAY_DATA_LARGE_SIZE",
        int,
        16 * 1024**2,
        "File mode: objects of this many bytes or more count as large (see data_large_streams).",
        "data",
        _positive,
    ),
    _s(
        "data_large_streams",
        "TORCHBAY_DATA_LARGE_STREAMS",
        int,
        4,
        "File mode: large objects fetched at the same time per process (4 beat 1 and 2 on a busy "
        "2-core box, 8 x 64 MiB on seaweedfs: 517-684 MiB/s against s5cmd's 439-456).",
        "data",
        _positive,
    ),
    _s(
        "data_objects_per_process",
        "TORCHBAY_DATA_OBJECTS_PER_PROCESS",
        int,
        4000,
        "File mode, data_processes=0: one staging worker process per this many objects, up to one "
        "per core (a "
        "worker costs ~0.35 s of CPU to start; the lean GET path needs ~0.2 ms per object).",
        "data",
        _positive,
    ),
    _s(
        "pipe_epochs",
        "TORCHBAY_PIPE_EPOCHS",
        int,
        100,
        "Pipe mode: FIFOs <channel>_0 .. _<N-1> are offered, each after the previous one was read "
        "to its end.",
        "data",
        _positive,
    ),
    _s(
        "pipe_prefetch",
        "TORCHBAY_PIPE_PREFETCH",
        int,
        4,
        "Pipe mode: objects fetched ahead in parallel while the FIFO is written in order (each held "
        ""
        ""
        "in memory).",
        "data",
        _positive,
    ),
)


# --- log/metric agent (issue 4) ----------------------------------------------------------------
def _opt_port(text: str) -> int | None:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("must be a TCP port (0 to 65535; 0 picks a free one)")
    return port


_TELEMETRY = (
    _s(
        "log_tag",
        "TORCHBAY_LOG_TAG",
        str,
        "[{host}:{rank}] ",
        "Prefix of every captured line; fields {host}, {rank} (global) and {stream} (stdout or "
        "stderr).",
        "telemetry",
    ),
    _s(
        "log_json",
        "TORCHBAY_LOG_JSON",
        parse_bool,
        False,
        "Write captured lines as JSON objects (time, host, rank, stream, line) instead of tagged "
        "text.",
        "telemetry",
    ),
    _s(
        "log_max_line",
        "TORCHBAY_LOG_MAX_LINE",
        int,
        65536,
        "Bytes after which a line is cut into pieces marked [...] (never dropped).",
        "telemetry",
        _positive,
    ),
    _s(
        "log_poll_interval",
        "TORCHBAY_LOG_POLL_INTERVAL",
        float,
        0.05,
        "Seconds between polls of the ranks' log files when they are idle.",
        "telemetry",
        _positive,
    ),
    _s(
        "metric_definitions",
        "TORCHBAY_METRIC_DEFINITIONS",
        _opt_str,
        None,
        'Extra metric definitions, SageMaker-style JSON: [{"Name": "train:loss", "Regex": '
        '"loss=(\\S+)"}].',
        "telemetry",
    ),
    _s(
        "sample_interval",
        "TORCHBAY_SAMPLE_INTERVAL",
        float,
        5.0,
        "Seconds between system metric samples (CPU, memory, disk, network, GPU); 0 turns sampling "
        "off.",
        "telemetry",
        _non_negative,
    ),
    _s(
        "prometheus_port",
        "TORCHBAY_PROMETHEUS_PORT",
        _opt_port,
        None,
        "Serve the system metrics for Prometheus on this port (unset: no endpoint).",
        "telemetry",
    ),
    _s(
        "prometheus_addr",
        "TORCHBAY_PROMETHEUS_ADDR",
        str,
        "127.0.0.1",
        "Address the Prometheus endpoint binds to.",
        "telemetry",
    ),
    _s(
        "upload_interval",
        "TORCHBAY_LOG_UPLOAD_INTERVAL",
        float,
        60.0,
        "Seconds between uploads of the job log and metrics file to the job's output prefix (and at "
        ""
        ""
        "the end).",
        "telemetry",
        _positive,
    ),
)


# --- distributed bootstrap (issue 5) -----------------------------------------------------------
def _dist_opt_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _dist_port(value: Any) -> None:
    if value is not None and not 0 < value < 65536:
        raise ValueError("must be a TCP port, 1-65535")


_DISTRIBUTED = (
    _s(
        "torchrun",
        "TORCHBAY_TORCHRUN",
        parse_bool,
        False,
        "Launch through torch.distributed.run even without the hyperparameter "
        "sagemaker_torch_distributed_enabled.",
        "distributed",
    ),
    _s(
        "nproc_per_node",
        "TORCHBAY_NPROC_PER_NODE",
        _dist_opt_int,
        None,
        "Processes per host under torch.distributed.run (default: PET_NPROC_PER_NODE, else one per "
        "GPU, else 1); "
        "above 1 it implies TORCHBAY_TORCHRUN.",
        "distributed",
        _positive,
    ),
    _s(
        "master_port",
        "TORCHBAY_MASTER_PORT",
        _dist_opt_int,
        None,
        "The master's port (default: MASTER_PORT, Slurm 15000+job id, 7777 for SageMaker-style host "
        ""
        ""
        "lists).",
        "distributed",
        _dist_port,
    ),
    _s(
        "socket_ifname",
        "TORCHBAY_SOCKET_IFNAME",
        _opt_str,
        None,
        "Network interface for NCCL/Gloo sockets (default: resourceconfig's if present, else the "
        "default route's).",
        "distributed",
    ),
    _s(
        "nccl_debug",
        "TORCHBAY_NCCL_DEBUG",
        _opt_str,
        "WARN",
        "NCCL_DEBUG for the ranks (empty: unset).",
        "distributed",
    ),
    _s(
        "host_wait_timeout",
        "TORCHBAY_HOST_WAIT_TIMEOUT",
        float,
        300.0,
        "Seconds to wait for every host to report to the master (identity exchange; with it off: "
        "every host name "
        "to resolve and, on workers, the master to accept connections).",
        "distributed",
        _positive,
    ),
    _s(
        "exchange_port",
        "TORCHBAY_EXCHANGE_PORT",
        int,
        29499,
        "TCP port of the identity exchange on the master (hosts report at start, failures stop "
        "every host; "
        "0: off).",
        "distributed",
        _non_negative,
    ),
    _s(
        "hosts_file",
        "TORCHBAY_HOSTS_FILE",
        str,
        "/etc/hosts",
        "Where the agent adds the job's host names that do not resolve (when it may write the "
        "file).",
        "distributed",
    ),
    _s(
        "rdzv_timeout",
        "TORCHBAY_RDZV_TIMEOUT",
        int,
        300,
        "Seconds torch.distributed.run waits for every host to join the rendezvous.",
        "distributed",
        _positive,
    ),
    _s(
        "monitor_interval",
        "TORCHBAY_MONITOR_INTERVAL",
        float,
        0.1,
        "Seconds between torch.distributed.run's checks of its ranks (a dead rank is seen within "
        "this).",
        "distributed",
        _positive,
    ),
    _s(
        "max_restarts",
        "TORCHBAY_MAX_RESTARTS",
        int,
        3,
        "Restarts of an elastic (PET_RDZV_ENDPOINT) job's ranks before it fails (PET_MAX_RESTARTS "
        "wins).",
        "distributed",
        _non_negative,
    ),
    _s(
        "nccl_timeout",
        "TORCHBAY_NCCL_TIMEOUT",
        _dist_opt_int,
        600,
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC: seconds before NCCL's watchdog ends a rank stuck in a "
        "collective.",
        "distributed",
        _positive,
    ),
)


# --- serving (issue 6) -------------------------------------------------------------------------
def _opt_int(text: str) -> int | None:
    return int(text) if text.strip() else None


def _opt_float(text: str) -> float | None:
    return float(text) if text.strip() else None


_SERVING = (
    _s(
        "serve_port",
        "SAGEMAKER_BIND_TO_PORT",
        int,
        8080,
        "Port `torchbay serve` listens on (the --port flag overrides it).",
        "serving",
        _non_negative,
    ),
    _s(
        "serve_host",
        "TORCHBAY_SERVE_HOST",
        str,
        "0.0.0.0",
        "Address `torchbay serve` binds to (--host overrides it).",
        "serving",
    ),
    _s(
        "serve_model_uri",
        ("TORCHBAY_MODEL_URI", "SAGEMAKER_MODEL_DATA"),
        _opt_str,
        None,
        "A model.tar.gz (s3:// or file://) fetched and unpacked into <root>/model before serving "
        "(unset: use "
        "what is there).",
        "serving",
    ),
    _s(
        "serve_program",
        "SAGEMAKER_PROGRAM",
        str,
        "inference.py",
        "The module in <model>/code whose hooks (model_fn, input_fn, predict_fn, output_fn, "
        "transform_fn) are "
        "used when it exists.",
        "serving",
    ),
    _s(
        "serve_workers",
        "SAGEMAKER_MODEL_SERVER_WORKERS",
        _opt_int,
        None,
        "Worker processes (unset: one per core, or TORCHBAY_SERVE_WORKERS_PER_GPU per GPU).",
        "serving",
        _positive,
    ),
    _s(
        "serve_workers_per_gpu",
        "TORCHBAY_SERVE_WORKERS_PER_GPU",
        _opt_int,
        None,
        "Worker processes per GPU when SAGEMAKER_MODEL_SERVER_WORKERS is unset (unset: min(4, cores "
        ""
        ""
        "// GPUs), at "
        "least 1), so HTTP and decoding are not one process's work; workers go to the GPUs "
        "round-robin.",
        "serving",
        _positive,
    ),
    _s(
        "serve_torch_threads",
        "TORCHBAY_SERVE_TORCH_THREADS",
        _opt_int,
        None,
        "torch intra-op threads per worker (unset: cores // workers, at least 1).",
        "serving",
        _positive,
    ),
    _s(
        "serve_http_threads",
        "TORCHBAY_SERVE_HTTP_THREADS",
        _opt_int,
        None,
        "Requests each worker holds at once (unset: 2 x the batch size, at least 4).",
        "serving",
        _positive,
    ),
    _s(
        "serve_timeout",
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"),
        float,
        60.0,
        "Seconds a request may take; a slower one is answered 504 and the worker lives on.",
        "serving",
        _positive,
    ),
    _s(
        "serve_max_payload_mb",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB",
        float,
        6.0,
        "Largest request body in MiB; a bigger one is answered 413 before it is read.",
        "serving",
        _positive,
    ),
    _s(
        "serve_default_accept",
        "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT",
        str,
        "application/json",
        "Response type when a request has no Accept header or accepts anything.",
        "serving",
    ),
    _s(
        "serve_batch_size",
        ("TORCHBAY_SERVE_BATCH_SIZE", "SAGEMAKER_TS_BATCH_SIZE"),
        int,
        1,
        "Dynamic batching: most requests joined into one forward() (1: no batching).",
        "serving",
        _positive,
    ),
    _s(
        "serve_batch_delay_ms",
        ("TORCHBAY_SERVE_BATCH_DELAY_MS", "SAGEMAKER_TS_MAX_BATCH_DELAY"),
        float,
        5.0,
        "Dynamic batching: longest wait in ms for more requests once one is waiting (none when it "
        "is alone).",
        "serving",
        _non_negative,
    ),
    _s(
        "serve_grace_period",
        "TORCHBAY_SERVE_GRACE_PERIOD",
        float,
        25.0,
        "Seconds SIGTERM gives in-flight requests before workers are killed (SageMaker kills at "
        "30).",
        "serving",
        _positive,
    ),
    _s(
        "serve_preload",
        "TORCHBAY_SERVE_PRELOAD",
        parse_bool,
        True,
        "Load the model once before the workers fork, so its weights are shared (off: one copy per "
        "worker; "
        "always off on GPUs).",
        "serving",
    ),
    _s(
        "serve_crash_window",
        "TORCHBAY_SERVE_CRASH_WINDOW",
        float,
        10.0,
        "Seconds /ping stays unhealthy after a worker died unexpectedly.",
        "serving",
        _non_negative,
    ),
    _s(
        "serve_header_timeout",
        "TORCHBAY_SERVE_HEADER_TIMEOUT",
        float,
        10.0,
        "Seconds a client has to send a request's headers once it connected or began a request; "
        "then 408 and "
        "the connection is closed (no request thread waits on a client meanwhile).",
        "serving",
        _positive,
    ),
    _s(
        "serve_body_min_rate",
        "TORCHBAY_SERVE_BODY_MIN_RATE",
        float,
        65536.0,
        "Slowest body upload in bytes/s: a body must arrive within the header timeout plus its "
        "length at this "
        "rate, else 408.",
        "serving",
        _positive,
    ),
    _s(
        "serve_keepalive",
        "TORCHBAY_SERVE_KEEPALIVE",
        float,
        5.0,
        "Seconds an idle keep-alive connection stays open.",
        "serving",
        _positive,
    ),
    _s(
        "serve_max_decoded_mb",
        "TORCHBAY_SERVE_MAX_DECODED_MB",
        _opt_float,
        None,
        "Largest decoded input in MiB (NPY/NPZ as declared, JSON/CSV as float32), checked before "
        "decoding; "
        "bigger is answered 413 (unset: 4 x SAGEMAKER_MAX_PAYLOAD_IN_MB).",
        "serving",
        _positive,
    ),
    _s(
        "serve_max_image_pixels",
        "TORCHBAY_SERVE_MAX_IMAGE_PIXELS",
        int,
        4096 * 4096,
        "Largest image (width x height) decoded; a bigger one is answered 413 from its header.",
        "serving",
        _positive,
    ),
    _s(
        "serve_max_json_depth",
        "TORCHBAY_SERVE_MAX_JSON_DEPTH",
        int,
        32,
        "Deepest nesting of a JSON body; deeper is answered 400 before parsing.",
        "serving",
        _positive,
    ),
    _s(
        "serve_stuck_timeout",
        "TORCHBAY_SERVE_STUCK_TIMEOUT",
        _opt_float,
        None,
        "Seconds one model call may run before its worker is replaced (/ping says 503 naming it "
        "meanwhile; "
        "unset: SAGEMAKER_MODEL_SERVER_TIMEOUT + 30).",
        "serving",
        _positive,
    ),
    _s(
        "serve_model_file",
        "TORCHBAY_SERVE_MODEL_FILE",
        _opt_str,
        None,
        "Which file in <model> to serve: a file name, or a format (aoti, export, torchscript). "
        "Unset: the only "
        ".pt2/.pt/.pth file; with several, the first of aoti, export, torchscript present (model.* "
        "first).",
        "serving",
    ),
    _s(
        "serve_compile",
        "TORCHBAY_SERVE_COMPILE",
        parse_bool,
        False,
        "Run a torch.export program through torch.compile (compiled by the warm-up, before the fork "
        ""
        ""
        "on CPU; "
        "the compile time is logged).",
        "serving",
    ),
    _s(
        "serve_multi_model",
        ("TORCHBAY_MULTI_MODEL", "SAGEMAKER_MULTI_MODEL"),
        parse_bool,
        False,
        "Multi-model mode: the SageMaker /models contract, models loaded and unloaded at run time "
        "under "
        "<root>/models, one worker process (see the README's multi-model section).",
        "serving",
    ),
    _s(
        "mme_model_prefix",
        "TORCHBAY_MME_MODEL_PREFIX",
        _opt_str,
        None,
        "Multi-model mode: s3:// or file:// prefix a model named in a request but not loaded is "
        "fetched from "
        "(<prefix>/<name> when it ends in .tar.gz, else <prefix>/<name>/model.tar.gz or "
        "<prefix>/<name>.tar.gz) "
        "and loaded on first use, least recently used models unloaded to make room (unset: 404).",
        "serving",
    ),
    _s(
        "mme_memory_mb",
        "TORCHBAY_MME_MEMORY_MB",
        _opt_int,
        None,
        "Multi-model mode: MiB all loaded models may take together (unset: 80% of the memory the "
        "container may "
        "use); a model that cannot fit is answered 507.",
        "serving",
        _positive,
    ),
)

# --- batch transform (issue 16) ----------------------------------------------------------------
_TRANSFORM = (
    _s(
        "transform_endpoint",
        "TORCHBAY_TRANSFORM_ENDPOINT",
        _opt_str,
        None,
        "`torchbay transform`: URL of a running endpoint (http://host:port) to send requests to "
        "(unset: start "
        "`torchbay serve` on 127.0.0.1 for the job).",
        "transform",
    ),
    _s(
        "transform_progress_interval",
        "TORCHBAY_TRANSFORM_PROGRESS_INTERVAL",
        float,
        10.0,
        "`torchbay transform`: seconds between progress lines (records, objects, rate, ETA).",
        "transform",
        _positive,
    ),
    _s(
        "transform_startup_timeout",
        "TORCHBAY_TRANSFORM_STARTUP_TIMEOUT",
        float,
        600.0,
        "`torchbay transform`: seconds the started server may take to answer /ping 200.",
        "transform",
        _positive,
    ),
)

# --- live sync (issue 8) -----------------------------------------------------------------------
_SYNC = (
    _s(
        "sync_delete",
        "TORCHBAY_SYNC_DELETE",
        parse_bool,
        True,
        "Delete the S3 copy when a synced file (checkpoint, intermediate output) is deleted "
        "locally.",
        "sync",
    ),
    _s(
        "sync_workers",
        "TORCHBAY_SYNC_WORKERS",
        int,
        4,
        "Uploads the live sync runs at once (each large file also sends up to 4 parts at once).",
        "sync",
        _positive,
    ),
    _s(
        "sync_settle",
        "TORCHBAY_SYNC_SETTLE",
        float,
        0.05,
        "Seconds a closed file must stay untouched before it is uploaded (bursts of writes become "
        "one upload).",
        "sync",
        _non_negative,
    ),
    _s(
        "sync_stable",
        "TORCHBAY_SYNC_STABLE",
        float,
        2.0,
        "Seconds an open file (TensorBoard events) must keep its size and mtime to be sent; "
        "growing: every 5x.",
        "sync",
        _positive,
    ),
    _s(
        "sync_part_size",
        "TORCHBAY_SYNC_PART_SIZE",
        int,
        16 * 1024 * 1024,
        "Bytes per multipart part; files this size or larger go multipart (at least 5 MiB on S3).",
        "sync",
        _positive,
    ),
    _s(
        "sync_retry_max",
        "TORCHBAY_SYNC_RETRY_MAX",
        float,
        30.0,
        "Longest pause in seconds between retries of an upload while the endpoint is unreachable.",
        "sync",
        _positive,
    ),
    _s(
        "sync_ignore",
        "TORCHBAY_SYNC_IGNORE",
        str,
        "*.tmp,*.part,*.partial,*.swp,*~",
        "Comma-separated name patterns never uploaded (write checkpoints to such a name, then "
        "rename).",
        "sync",
    ),
)

# --- training faults (issue 14) ------------------------------------------------------------------
_FAULTS = (
    _s(
        "upload_part_size",
        "TORCHBAY_UPLOAD_PART_SIZE",
        int,
        16 * 1024 * 1024,
        "Bytes per part of the end-of-job multipart uploads (model.tar.gz, output.tar.gz); larger "
        "files go "
        "multipart, and a retry after an outage sends only the parts S3 does not have (at least 5 "
        "MiB).",
        "train",
        _positive,
    ),
    _s(
        "secret_names",
        "TORCHBAY_SECRET_NAMES",
        str,
        r"password|passwd|passphrase|secret|credential|api_?key|private_?key|(^|_)(token|auth|cookie)(_|$)"
        r"|(^|_)key$",
        "Regular expression (searched in the name lower-cased, camelCase and -. turned into _) of "
        "hyperparameter "
        "and environment variable names whose values are masked as **** in every line the agent "
        "writes.",
        "train",
    ),
    _s(
        "source_max_bytes",
        "TORCHBAY_SOURCE_MAX_BYTES",
        int,
        4 * 1024**3,
        "Most bytes the source archive (sagemaker_submit_directory) may unpack to; more fails the "
        "job (a gzip "
        "bomb stops there).",
        "train",
        _positive,
    ),
    _s(
        "source_max_members",
        "TORCHBAY_SOURCE_MAX_MEMBERS",
        int,
        200_000,
        "Most files, folders and links the source archive may hold.",
        "train",
        _positive,
    ),
)

ALL_SETTINGS: tuple = (
    _GENERAL + _TRAIN + _DATA + _TELEMETRY + _DISTRIBUTED + _SERVING + _SYNC + _FAULTS + _TRANSFORM
)


class Settings:
    """Frozen values of every setting, read once; attribute access by setting name."""

    __slots__ = ("_sources", "_values")

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
        object.__setattr__(self, "_values", types.MappingProxyType(dict(values)))
        object.__setattr__(self, "_sources", types.MappingProxyType(dict(sources)))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no setting named {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings are frozen")

    def source(self, name: str) -> str:
        """The environment variable a value came from, or ``default``."""
        return self._sources.get(name, "default")

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (for tests and command-line flags)."""
        values = dict(self._values)
        for key in changes:
            if key not in values:
                raise AttributeError(f"no setting named {key!r}")
        values.update(changes)
        return Settings(values, self._sources)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


def read_settings(env: Mapping[str, str], declared: Iterable[Setting] = ALL_SETTINGS) -> Settings:
    """Read every declared setting from ``env``; raises ConfigError naming a bad variable and value."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in declared:
        values[setting.name] = setting.default
        for var in setting.env:
            raw = env.get(var)
            if raw is not None and raw != "":
                values[setting.name] = setting.parse(raw)
                sources[setting.name] = var
                break
    return Settings(values, sources)
