"""Every tunable, declared once: name, environment variable, type, default, validator and help.

Each part of the agent has a frozen dataclass of typed fields (:class:`TrainSettings`,
:class:`DataSettings`, ...); a field's declaration (:func:`setting`) is its environment
variable, default, help and validator. :class:`Settings` holds one of each part
(``job.settings.data.data_threads``). Values are read from an environment mapping exactly
once, by :func:`read_settings` (load_job for a train job; ``torchbay serve`` and
``torchbay transform`` for themselves); nothing else reads the environment for a setting.
The README's settings table (``torchbay settings``) and the serve command's flags
(``agent.cli.add_setting_flags``) are generated from the same declarations, so they cannot
drift from this file.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from agent.errors import ConfigError

__all__ = [
    "ALL_SETTINGS",
    "PARTS",
    "DataSettings",
    "DistributedSettings",
    "GeneralSettings",
    "ServingSettings",
    "Setting",
    "Settings",
    "SyncSettings",
    "TelemetrySettings",
    "TrainSettings",
    "TransformSettings",
    "check_port",
    "parse_bool",
    "read_settings",
    "setting",
]

T = TypeVar("T")
P = TypeVar("P", bound="_Part")


# --- parsers and validators ------------------------------------------------------------------
def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` and ``0/false/no/off`` (any case); anything else is a ValueError."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def opt_str(text: str) -> str | None:
    """The text, or None when it is empty."""
    return text or None


def opt_int(text: str) -> int | None:
    """An integer, or None when the text is blank."""
    return int(text) if text.strip() else None


def opt_float(text: str) -> float | None:
    """A number, or None when the text is blank."""
    return float(text) if text.strip() else None


def positive(value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError("must be greater than 0")


def non_negative(value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError("must be 0 or more")


def check_port(value: int | None, *, zero: str | None = None) -> None:
    """The one TCP port check: 1 to 65535, or 0 too when ``zero`` says what 0 means.

    Raises ValueError saying the range; callers name the setting or variable and the value.
    """
    if value is None:
        return
    low = 0 if zero is not None else 1
    if not low <= value <= 65535:
        raise ValueError(
            f"must be a TCP port, {low} to 65535" + (f" (0 {zero})" if zero is not None else "")
        )


def _port(zero: str | None = None) -> Callable[[int | None], None]:
    def check(value: int | None) -> None:
        check_port(value, zero=zero)

    return check


# --- declarations ----------------------------------------------------------------------------
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
        """The value of ``raw`` (from the variable), checked; ConfigError naming both."""
        try:
            value = self.type(raw)
            if self.validator is not None:
                self.validator(value)
        except ValueError as err:
            raise ConfigError(
                f"setting {self.env[0]}={raw!r} is invalid: {err}; see `torchbay settings`"
            ) from err
        return value

    def check(self, value: Any) -> None:
        """Check a value given directly (a command-line flag, ``Settings.replace``)."""
        if self.validator is None:
            return
        try:
            self.validator(value)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"setting {self.name}={value!r} (or {self.env[0]}) is invalid: {err}; see "
                "`torchbay settings`"
            ) from err


_DECLARATION = "torchbay.setting"


def setting(
    env: Sequence[str] | str,
    default: T,
    help_: str,
    parse: Callable[[str], T],
    check: Callable[[T], None] | None = None,
) -> T:
    """A part's field declared as a setting: its variable(s), default, help, parser and check.

    Used as a dataclass field's default (``threads: int = setting(...)``); the field's name is the
    setting's name and its part's SECTION its section.
    """
    variables = (env,) if isinstance(env, str) else tuple(env)
    declared = {_DECLARATION: (variables, help_, parse, check)}
    return field(default=default, metadata=declared)


def _declared(part: type[_Part]) -> tuple[Setting, ...]:
    out = []
    for item in dataclasses.fields(part):
        variables, help_, parse, check = item.metadata[_DECLARATION]
        out.append(Setting(item.name, variables, parse, item.default, help_, part.SECTION, check))
    return tuple(out)


@dataclass(frozen=True)
class _Part:
    """A part's settings: every value is checked when the part is made (also by replace)."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        for declared in _declared(type(self)):
            declared.check(getattr(self, declared.name))


@dataclass(frozen=True)
class GeneralSettings(_Part):
    """Where the job is, how the agent logs and how it reaches S3."""

    SECTION: ClassVar[str] = "general"

    root: str = setting(
        ("TORCHBAY_ROOT", "SAGEMAKER_BASE_DIR"),
        "/opt/ml",
        "Root of the SageMaker layout (input/, model/, output/, code/, checkpoints/).",
        str,
    )
    job: str | None = setting(
        "TORCHBAY_JOB",
        None,
        "The job spec: a path to a CreateTrainingJob-shaped JSON file, or the JSON itself.",
        opt_str,
    )
    log_level: str = setting(
        "TORCHBAY_LOG_LEVEL",
        "INFO",
        "The agent's log level (DEBUG, INFO, WARNING, ERROR).",
        str,
    )
    endpoint_url: str | None = setting(
        ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"),
        None,
        "S3-compatible endpoint for every s3:// URI (the standard AWS settings).",
        opt_str,
    )


@dataclass(frozen=True)
class TrainSettings(_Part):
    """The train lifecycle (agent.training, agent.code, agent.job): hosts, time limits, uploads,
    secrets."""

    SECTION: ClassVar[str] = "train"

    grace_period: float = setting(
        "TORCHBAY_GRACE_PERIOD",
        30.0,
        "Seconds between SIGTERM to the user's processes and SIGKILL.",
        float,
        positive,
    )
    hosts: str | None = setting(
        "TORCHBAY_HOSTS",
        None,
        "Comma-separated hosts of a job run from a spec (default algo-1..algo-N for "
        "InstanceCount N).",
        opt_str,
    )
    current_host: str | None = setting(
        "TORCHBAY_CURRENT_HOST",
        None,
        "This host's name among TORCHBAY_HOSTS (default the first host).",
        opt_str,
    )
    network_interface: str = setting(
        "TORCHBAY_NETWORK_INTERFACE",
        "eth0",
        "network_interface_name written to resourceconfig.json for a job run from a spec.",
        str,
    )
    pip_timeout: float = setting(
        "TORCHBAY_PIP_TIMEOUT",
        1800.0,
        "Seconds `pip install` of the user's requirements may take before the job fails.",
        float,
        positive,
    )
    upload_timeout: float = setting(
        "TORCHBAY_UPLOAD_TIMEOUT",
        600.0,
        "Seconds the end-of-job uploads (model, outputs, checkpoints) may take.",
        float,
        positive,
    )
    line_buffer: bool = setting(
        "TORCHBAY_LINE_BUFFER",
        True,
        "Start the user's command under coreutils `stdbuf -oL -eL`, so C-level stdio (NCCL, "
        "C++ extensions, awk) is line-buffered and a killed process loses no finished line; "
        "off, or where stdbuf is missing, only Python output is unbuffered "
        "(PYTHONUNBUFFERED=1).",
        parse_bool,
    )
    upload_part_size: int = setting(
        "TORCHBAY_UPLOAD_PART_SIZE",
        4096 * 4096,
        "Bytes per part of the end-of-job multipart uploads (model.tar.gz, output.tar.gz); "
        "larger files go multipart, and a retry after an outage sends only the parts S3 does "
        "not have (at least 5 MiB).",
        int,
        positive,
    )
    secret_names: str = setting(
        "TORCHBAY_SECRET_NAMES",
        "password|passwd|passphrase|secret|credential|api_?key|private_?key|(^|_)(token|auth|cookie)(_|$)|(^|_)key$",
        "Regular expression (searched in the name lower-cased, camelCase and -. turned into "
        "_) of hyperparameter and environment variable names whose values are masked as **** "
        "in every line the agent writes.",
        str,
    )
    source_max_bytes: int = setting(
        "TORCHBAY_SOURCE_MAX_BYTES",
        4 * 1024**3,
        "Most bytes the source archive (sagemaker_submit_directory) may unpack to; more fails "
        "the job (a gzip bomb stops there).",
        int,
        positive,
    )
    source_max_members: int = setting(
        "TORCHBAY_SOURCE_MAX_MEMBERS",
        200_000,
        "Most files, folders and links the source archive may hold.",
        int,
        positive,
    )


@dataclass(frozen=True)
class DataSettings(_Part):
    """Input channels (agent.data): File-mode staging and Pipe mode."""

    SECTION: ClassVar[str] = "data"

    data_threads: int = setting(
        "TORCHBAY_DATA_THREADS",
        16,
        "File mode: parallel GETs per staging process.",
        int,
        positive,
    )
    data_processes: int = setting(
        "TORCHBAY_DATA_PROCESSES",
        0,
        "File mode: staging worker processes, each with its own S3 client (0: pick from the "
        "listing, up to one per core for many small objects).",
        int,
        non_negative,
    )
    data_range_threshold: int = setting(
        "TORCHBAY_DATA_RANGE_THRESHOLD",
        1024**3,
        "File mode: objects of this many bytes or more are fetched in parallel ranges (one "
        "stream each below).",
        int,
        positive,
    )
    data_range_size: int = setting(
        "TORCHBAY_DATA_RANGE_SIZE",
        64 * 1024**2,
        "File mode: bytes per ranged GET for objects at or above the range threshold.",
        int,
        positive,
    )
    data_attempts: int = setting(
        "TORCHBAY_DATA_ATTEMPTS",
        5,
        "Attempts per object (short reads, dropped connections, 5xx) before staging fails.",
        int,
        positive,
    )
    data_progress_interval: float = setting(
        "TORCHBAY_DATA_PROGRESS_INTERVAL",
        5.0,
        "Seconds between staging progress lines (files, bytes, rate, ETA).",
        float,
        positive,
    )
    data_verify_md5: bool = setting(
        "TORCHBAY_DATA_VERIFY_MD5",
        True,
        "Check each whole-object download against its ETag when the ETag is a plain MD5.",
        parse_bool,
    )
    data_lean_get: bool = setting(
        "TORCHBAY_DATA_LEAN_GET",
        True,
        "File mode: whole-object GETs signed here and read over http.client (about a fifth of "
        "botocore's CPU per GET); anything unusual (an error, a redirect, a chunked body) "
        "falls back to boto3.",
        parse_bool,
    )
    data_read_size: int = setting(
        "TORCHBAY_DATA_READ_SIZE",
        1024**2,
        "File mode: bytes per read of a large body into a reused buffer (1 MiB stays in "
        "cache; 4-16 MiB measured slower).",
        int,
        positive,
    )
    data_md5_max_size: int = setting(
        "TORCHBAY_DATA_MD5_MAX_SIZE",
        1024**3,
        "File mode, lean GETs: each body is checked by its byte count and by the full-object "
        "CRC32/SHA S3 returns; only when S3 returns none, objects up to this size are checked "
        "against a plain-MD5 ETag (MD5 costs ~1.2 ms of CPU per MiB here, CRC32 ~0.15).",
        int,
        non_negative,
    )
    data_small_size: int = setting(
        "TORCHBAY_DATA_SMALL_SIZE",
        1024**2,
        "File mode, lean GETs to a plain-HTTP endpoint: objects up to this size are fetched by one "
        "thread over data_small_connections non-blocking connections, each body checked as on the "
        "threads (a pool of threads spends its CPU handing the GIL around: 2,000 x 64 KiB went "
        "from 0.83 to 1.14 of s5cmd's rate); 0 fetches every object on the threads.",
        int,
        non_negative,
    )
    data_small_connections: int = setting(
        "TORCHBAY_DATA_SMALL_CONNECTIONS",
        64,
        "File mode: connections the one thread fetching the small objects (data_small_size) keeps "
        "open at a time (64 beat 16 in 12 of 15 interleaved rounds, 2,000 x 64 KiB on seaweedfs, "
        "0.92 of the time).",
        int,
        positive,
    )
    data_large_size: int = setting(
        "TORCHBAY_DATA_LARGE_SIZE",
        4096 * 4096,
        "File mode: objects of this many bytes or more count as large (see data_large_streams).",
        int,
        positive,
    )
    data_large_streams: int = setting(
        "TORCHBAY_DATA_LARGE_STREAMS",
        4,
        "File mode: large objects fetched at the same time per process (4 beat 1 and 2 on a busy "
        "2-core box, 8 x 64 MiB on seaweedfs: 517-684 MiB/s against s5cmd's 439-456).",
        int,
        positive,
    )
    data_objects_per_process: int = setting(
        "TORCHBAY_DATA_OBJECTS_PER_PROCESS",
        4000,
        "File mode, data_processes=0: one staging worker process per this many objects, up to "
        "one per core (a worker costs ~0.35 s of CPU to start; the lean GET path needs ~0.2 "
        "ms per object).",
        int,
        positive,
    )
    pipe_epochs: int = setting(
        "TORCHBAY_PIPE_EPOCHS",
        100,
        "Pipe mode: FIFOs <channel>_0 .. _<N-1> are offered, each after the previous one was "
        "read to its end.",
        int,
        positive,
    )
    pipe_prefetch: int = setting(
        "TORCHBAY_PIPE_PREFETCH",
        4,
        "Pipe mode: objects fetched ahead in parallel while the FIFO is written in order "
        "(each held in memory).",
        int,
        positive,
    )


@dataclass(frozen=True)
class TelemetrySettings(_Part):
    """Log capture, regex metrics, system metrics and log shipping (agent.telemetry)."""

    SECTION: ClassVar[str] = "telemetry"

    log_tag: str = setting(
        "TORCHBAY_LOG_TAG",
        "[{host}:{rank}] ",
        "Prefix of every captured line; fields {host}, {rank} (global) and {stream} (stdout "
        "or stderr).",
        str,
    )
    log_json: bool = setting(
        "TORCHBAY_LOG_JSON",
        False,
        "Write captured lines as JSON objects (time, host, rank, stream, line) instead of "
        "tagged text.",
        parse_bool,
    )
    log_max_line: int = setting(
        "TORCHBAY_LOG_MAX_LINE",
        65536,
        "Bytes after which a line is cut into pieces marked [...] (never dropped).",
        int,
        positive,
    )
    log_poll_interval: float = setting(
        "TORCHBAY_LOG_POLL_INTERVAL",
        0.05,
        "Seconds between polls of the ranks' log files when they are idle.",
        float,
        positive,
    )
    metric_definitions: str | None = setting(
        "TORCHBAY_METRIC_DEFINITIONS",
        None,
        'Extra metric definitions, SageMaker-style JSON: [{"Name": "train:loss", "Regex": '
        '"loss=(\\S+)"}].',
        opt_str,
    )
    sample_interval: float = setting(
        "TORCHBAY_SAMPLE_INTERVAL",
        5.0,
        "Seconds between system metric samples (CPU, memory, disk, network, GPU); 0 turns "
        "sampling off.",
        float,
        non_negative,
    )
    prometheus_port: int | None = setting(
        "TORCHBAY_PROMETHEUS_PORT",
        None,
        "Serve the system metrics for Prometheus on this port (unset: no endpoint).",
        opt_int,
        _port(zero="picks a free one"),
    )
    prometheus_addr: str = setting(
        "TORCHBAY_PROMETHEUS_ADDR",
        "127.0.0.1",
        "Address the Prometheus endpoint binds to.",
        str,
    )
    upload_interval: float = setting(
        "TORCHBAY_LOG_UPLOAD_INTERVAL",
        60.0,
        "Seconds between uploads of the job log and metrics file to the job's output prefix "
        "(and at the end).",
        float,
        positive,
    )


@dataclass(frozen=True)
class DistributedSettings(_Part):
    """The distributed bootstrap (agent.distributed)."""

    SECTION: ClassVar[str] = "distributed"

    torchrun: bool = setting(
        "TORCHBAY_TORCHRUN",
        False,
        "Launch through torch.distributed.run even without the hyperparameter "
        "sagemaker_torch_distributed_enabled.",
        parse_bool,
    )
    nproc_per_node: int | None = setting(
        "TORCHBAY_NPROC_PER_NODE",
        None,
        "Processes per host under torch.distributed.run (default: PET_NPROC_PER_NODE, else "
        "one per GPU, else 1); above 1 it implies TORCHBAY_TORCHRUN.",
        opt_int,
        positive,
    )
    master_port: int | None = setting(
        "TORCHBAY_MASTER_PORT",
        None,
        "The master's port (default: MASTER_PORT, Slurm 15000+job id, 7777 for "
        "SageMaker-style host lists).",
        opt_int,
        _port(),
    )
    socket_ifname: str | None = setting(
        "TORCHBAY_SOCKET_IFNAME",
        None,
        "Network interface for NCCL/Gloo sockets (default: resourceconfig's if present, else "
        "the default route's).",
        opt_str,
    )
    nccl_debug: str | None = setting(
        "TORCHBAY_NCCL_DEBUG",
        opt_str("WARN"),
        "NCCL_DEBUG for the ranks (empty: unset).",
        opt_str,
    )
    host_wait_timeout: float = setting(
        "TORCHBAY_HOST_WAIT_TIMEOUT",
        300.0,
        "Seconds to wait for every host to report to the master (identity exchange; with it "
        "off: every host name to resolve and, on workers, the master to accept connections).",
        float,
        positive,
    )
    exchange_port: int = setting(
        "TORCHBAY_EXCHANGE_PORT",
        29499,
        "TCP port of the identity exchange on the master (hosts report at start, failures "
        "stop every host; 0: off).",
        int,
        _port(zero="off"),
    )
    hosts_file: str = setting(
        "TORCHBAY_HOSTS_FILE",
        "/etc/hosts",
        "Where the agent adds the job's host names that do not resolve (when it may write the "
        "file).",
        str,
    )
    rdzv_timeout: int = setting(
        "TORCHBAY_RDZV_TIMEOUT",
        300,
        "Seconds torch.distributed.run waits for every host to join the rendezvous.",
        int,
        positive,
    )
    monitor_interval: float = setting(
        "TORCHBAY_MONITOR_INTERVAL",
        0.1,
        "Seconds between torch.distributed.run's checks of its ranks (a dead rank is seen "
        "within this).",
        float,
        positive,
    )
    max_restarts: int = setting(
        "TORCHBAY_MAX_RESTARTS",
        3,
        "Restarts of an elastic (PET_RDZV_ENDPOINT) job's ranks before it fails "
        "(PET_MAX_RESTARTS wins).",
        int,
        non_negative,
    )
    nccl_timeout: int | None = setting(
        "TORCHBAY_NCCL_TIMEOUT",
        opt_int("600"),
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC: seconds before NCCL's watchdog ends a rank stuck "
        "in a collective.",
        opt_int,
        positive,
    )


@dataclass(frozen=True)
class ServingSettings(_Part):
    """``torchbay serve`` (agent.serving, resolved into a ServeConfig)."""

    SECTION: ClassVar[str] = "serving"

    serve_port: int = setting(
        "SAGEMAKER_BIND_TO_PORT",
        8080,
        "Port `torchbay serve` listens on (the --port flag overrides it).",
        int,
        _port(zero="picks a free one"),
    )
    serve_host: str = setting(
        "TORCHBAY_SERVE_HOST",
        "0.0.0.0",
        "Address `torchbay serve` binds to (--host overrides it).",
        str,
    )
    serve_model_uri: str | None = setting(
        ("TORCHBAY_MODEL_URI", "SAGEMAKER_MODEL_DATA"),
        None,
        "A model.tar.gz (s3:// or file://) fetched and unpacked into <root>/model before "
        "serving (unset: use what is there).",
        opt_str,
    )
    serve_program: str = setting(
        "SAGEMAKER_PROGRAM",
        "inference.py",
        "The module in <model>/code whose hooks (model_fn, input_fn, predict_fn, output_fn, "
        "transform_fn) are used when it exists.",
        str,
    )
    serve_workers: int | None = setting(
        "SAGEMAKER_MODEL_SERVER_WORKERS",
        None,
        "Worker processes (unset: one per core, or TORCHBAY_SERVE_WORKERS_PER_GPU per GPU).",
        opt_int,
        positive,
    )
    serve_workers_per_gpu: int | None = setting(
        "TORCHBAY_SERVE_WORKERS_PER_GPU",
        None,
        "Worker processes per GPU when SAGEMAKER_MODEL_SERVER_WORKERS is unset (unset: min(4, "
        "cores // GPUs), at least 1), so HTTP and decoding are not one process's work; "
        "workers go to the GPUs round-robin.",
        opt_int,
        positive,
    )
    serve_torch_threads: int | None = setting(
        "TORCHBAY_SERVE_TORCH_THREADS",
        None,
        "torch intra-op threads per worker (unset: cores // workers, at least 1).",
        opt_int,
        positive,
    )
    serve_http_threads: int | None = setting(
        "TORCHBAY_SERVE_HTTP_THREADS",
        None,
        "Requests each worker holds at once (unset: 2 x the batch size, at least 4).",
        opt_int,
        positive,
    )
    serve_timeout: float = setting(
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"),
        60.0,
        "Seconds a request may take; a slower one is answered 504 and the worker lives on.",
        float,
        positive,
    )
    serve_max_payload_mb: float = setting(
        "SAGEMAKER_MAX_PAYLOAD_IN_MB",
        6.0,
        "Largest request body in MiB; a bigger one is answered 413 before it is read.",
        float,
        positive,
    )
    serve_default_accept: str = setting(
        "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT",
        "application/json",
        "Response type when a request has no Accept header or accepts anything.",
        str,
    )
    serve_batch_size: int = setting(
        ("TORCHBAY_SERVE_BATCH_SIZE", "SAGEMAKER_TS_BATCH_SIZE"),
        1,
        "Dynamic batching: most requests joined into one forward() (1: no batching).",
        int,
        positive,
    )
    serve_batch_delay_ms: float = setting(
        ("TORCHBAY_SERVE_BATCH_DELAY_MS", "SAGEMAKER_TS_MAX_BATCH_DELAY"),
        5.0,
        "Dynamic batching: longest wait in ms for more requests once one is waiting (none "
        "when it is alone).",
        float,
        non_negative,
    )
    serve_grace_period: float = setting(
        "TORCHBAY_SERVE_GRACE_PERIOD",
        25.0,
        "Seconds SIGTERM gives in-flight requests before workers are killed (SageMaker kills "
        "at 30).",
        float,
        positive,
    )
    serve_preload: bool = setting(
        "TORCHBAY_SERVE_PRELOAD",
        True,
        "Load the model once before the workers fork, so its weights are shared (off: one "
        "copy per worker; always off on GPUs).",
        parse_bool,
    )
    serve_crash_window: float = setting(
        "TORCHBAY_SERVE_CRASH_WINDOW",
        10.0,
        "Seconds /ping stays unhealthy after a worker died unexpectedly.",
        float,
        non_negative,
    )
    serve_header_timeout: float = setting(
        "TORCHBAY_SERVE_HEADER_TIMEOUT",
        10.0,
        "Seconds a client has to send a request's headers once it connected or began a "
        "request; then 408 and the connection is closed (no request thread waits on a client "
        "meanwhile).",
        float,
        positive,
    )
    serve_body_min_rate: float = setting(
        "TORCHBAY_SERVE_BODY_MIN_RATE",
        65536.0,
        "Slowest body upload in bytes/s: a body must arrive within the header timeout plus "
        "its length at this rate, else 408.",
        float,
        positive,
    )
    serve_keepalive: float = setting(
        "TORCHBAY_SERVE_KEEPALIVE",
        5.0,
        "Seconds an idle keep-alive connection stays open.",
        float,
        positive,
    )
    serve_max_decoded_mb: float | None = setting(
        "TORCHBAY_SERVE_MAX_DECODED_MB",
        None,
        "Largest decoded input in MiB (NPY/NPZ as declared, JSON/CSV as float32), checked "
        "before decoding; bigger is answered 413 (unset: 4 x SAGEMAKER_MAX_PAYLOAD_IN_MB).",
        opt_float,
        positive,
    )
    serve_max_image_pixels: int = setting(
        "TORCHBAY_SERVE_MAX_IMAGE_PIXELS",
        4096 * 4096,
        "Largest image (width x height) decoded; a bigger one is answered 413 from its header.",
        int,
        positive,
    )
    serve_max_json_depth: int = setting(
        "TORCHBAY_SERVE_MAX_JSON_DEPTH",
        32,
        "Deepest nesting of a JSON body; deeper is answered 400 before parsing.",
        int,
        positive,
    )
    serve_stuck_timeout: float | None = setting(
        "TORCHBAY_SERVE_STUCK_TIMEOUT",
        None,
        "Seconds one model call may run before its worker is replaced (/ping says 503 naming "
        "it meanwhile; unset: SAGEMAKER_MODEL_SERVER_TIMEOUT + 30).",
        opt_float,
        positive,
    )
    serve_model_file: str | None = setting(
        "TORCHBAY_SERVE_MODEL_FILE",
        None,
        "Which file in <model> to serve: a file name, or a format (aoti, export, "
        "torchscript). Unset: the only .pt2/.pt/.pth file; with several, the first of aoti, "
        "export, torchscript present (model.* first).",
        opt_str,
    )
    serve_compile: bool = setting(
        "TORCHBAY_SERVE_COMPILE",
        False,
        "Run a torch.export program through torch.compile (compiled by the warm-up, before "
        "the fork on CPU; the compile time is logged).",
        parse_bool,
    )
    serve_multi_model: bool = setting(
        ("TORCHBAY_MULTI_MODEL", "SAGEMAKER_MULTI_MODEL"),
        False,
        "Multi-model mode: the SageMaker /models contract, models loaded and unloaded at run "
        "time under <root>/models, one worker process (see the README's multi-model section).",
        parse_bool,
    )
    mme_model_prefix: str | None = setting(
        "TORCHBAY_MME_MODEL_PREFIX",
        None,
        "Multi-model mode: s3:// or file:// prefix a model named in a request but not loaded "
        "is fetched from (<prefix>/<name> when it ends in .tar.gz, else "
        "<prefix>/<name>/model.tar.gz or <prefix>/<name>.tar.gz) and loaded on first use, "
        "least recently used models unloaded to make room (unset: 404).",
        opt_str,
    )
    mme_memory_mb: int | None = setting(
        "TORCHBAY_MME_MEMORY_MB",
        None,
        "Multi-model mode: MiB all loaded models may take together (unset: 80% of the memory "
        "the container may use); a model that cannot fit is answered 507.",
        opt_int,
        positive,
    )


@dataclass(frozen=True)
class SyncSettings(_Part):
    """Live sync of checkpoints and intermediate outputs (agent.sync)."""

    SECTION: ClassVar[str] = "sync"

    sync_delete: bool = setting(
        "TORCHBAY_SYNC_DELETE",
        True,
        "Delete the S3 copy when a synced file (checkpoint, intermediate output) is deleted "
        "locally.",
        parse_bool,
    )
    sync_workers: int = setting(
        "TORCHBAY_SYNC_WORKERS",
        4,
        "Uploads the live sync runs at once (each large file also sends up to 4 parts at once).",
        int,
        positive,
    )
    sync_settle: float = setting(
        "TORCHBAY_SYNC_SETTLE",
        0.05,
        "Seconds a closed file must stay untouched before it is uploaded (bursts of writes "
        "become one upload).",
        float,
        non_negative,
    )
    sync_stable: float = setting(
        "TORCHBAY_SYNC_STABLE",
        2.0,
        "Seconds an open file (TensorBoard events) must keep its size and mtime to be sent; "
        "growing: every 5x.",
        float,
        positive,
    )
    sync_part_size: int = setting(
        "TORCHBAY_SYNC_PART_SIZE",
        4096 * 4096,
        "Bytes per multipart part; files this size or larger go multipart (at least 5 MiB on S3).",
        int,
        positive,
    )
    sync_retry_max: float = setting(
        "TORCHBAY_SYNC_RETRY_MAX",
        30.0,
        "Longest pause in seconds between retries of an upload while the endpoint is unreachable.",
        float,
        positive,
    )
    sync_ignore: str = setting(
        "TORCHBAY_SYNC_IGNORE",
        "*.tmp,*.part,*.partial,*.swp,*~",
        "Comma-separated name patterns never uploaded (write checkpoints to such a name, then "
        "rename).",
        str,
    )


@dataclass(frozen=True)
class TransformSettings(_Part):
    """``torchbay transform`` (agent.transform)."""

    SECTION: ClassVar[str] = "transform"

    transform_endpoint: str | None = setting(
        "TORCHBAY_TRANSFORM_ENDPOINT",
        None,
        "`torchbay transform`: URL of a running endpoint (http://host:port) to send requests "
        "to (unset: start `torchbay serve` on 127.0.0.1 for the job).",
        opt_str,
    )
    transform_progress_interval: float = setting(
        "TORCHBAY_TRANSFORM_PROGRESS_INTERVAL",
        10.0,
        "`torchbay transform`: seconds between progress lines (records, objects, rate, ETA).",
        float,
        positive,
    )
    transform_startup_timeout: float = setting(
        "TORCHBAY_TRANSFORM_STARTUP_TIMEOUT",
        600.0,
        "`torchbay transform`: seconds the started server may take to answer /ping 200.",
        float,
        positive,
    )


PARTS: tuple[type[_Part], ...] = (
    GeneralSettings,
    TrainSettings,
    DataSettings,
    TelemetrySettings,
    DistributedSettings,
    ServingSettings,
    SyncSettings,
    TransformSettings,
)
ALL_SETTINGS: tuple[Setting, ...] = tuple(s for part in PARTS for s in _declared(part))
_PART_OF: Mapping[str, str] = types.MappingProxyType({s.name: s.section for s in ALL_SETTINGS})


def _no_sources() -> Mapping[str, str]:
    return types.MappingProxyType({})


@dataclass(frozen=True)
class Settings:
    """Every setting, one typed, frozen part per part of the agent: ``settings.data.data_threads``.

    ``sources`` maps a setting's name to the variable its value came from (absent: the default).
    """

    general: GeneralSettings = field(default_factory=GeneralSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    serving: ServingSettings = field(default_factory=ServingSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    transform: TransformSettings = field(default_factory=TransformSettings)
    sources: Mapping[str, str] = field(default_factory=_no_sources, compare=False, repr=False)

    def source(self, name: str) -> str:
        """The environment variable a value came from, or ``default``."""
        return self.sources.get(name, "default")

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed, by setting name (tests and command-line flags); each
        new value is checked (ConfigError); an unknown name is an AttributeError."""
        by_part: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            if name not in _PART_OF:
                raise AttributeError(f"no setting named {name!r}")
            by_part.setdefault(_PART_OF[name], {})[name] = value
        parts = {
            section: dataclasses.replace(getattr(self, section), **values)
            for section, values in by_part.items()
        }
        return dataclasses.replace(self, **parts)

    def as_dict(self) -> dict[str, Any]:
        """Every setting's value by name."""
        return {s.name: getattr(getattr(self, s.section), s.name) for s in ALL_SETTINGS}


def read_settings(env: Mapping[str, str]) -> Settings:
    """Read every declared setting from ``env``; raises ConfigError naming a bad variable and
    value."""
    values: dict[str, dict[str, Any]] = {part.SECTION: {} for part in PARTS}
    sources: dict[str, str] = {}
    for declared in ALL_SETTINGS:
        for var in declared.env:
            raw = env.get(var)
            if raw is not None and raw != "":
                values[declared.section][declared.name] = declared.parse(raw)
                sources[declared.name] = var
                break

    def part(cls: type[P]) -> P:
        return cls(**values[cls.SECTION])

    return Settings(
        general=part(GeneralSettings),
        train=part(TrainSettings),
        data=part(DataSettings),
        telemetry=part(TelemetrySettings),
        distributed=part(DistributedSettings),
        serving=part(ServingSettings),
        sync=part(SyncSettings),
        transform=part(TransformSettings),
        sources=types.MappingProxyType(sources),
    )
