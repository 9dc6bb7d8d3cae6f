"""The train lifecycle (``torchbay train``, ``entrypoints/train``).

One job, as the named steps of :class:`_Lifecycle`, in this order:

1. load_job (``main``), then the job's log and storage, the channels' listing on a thread of its
   own (it runs through the rest of the setup and the code download), the job's folders;
2. write the config files (not on SageMaker), fetch the code, then install its requirements while
   the channels are staged on another thread;
3. take the staged channels, restore the checkpoints;
4. wait for the hosts, plan the launch, start the log capture, start the user's process group;
5. wait for the script, starting live sync and telemetry at the wait's first tick, off the
   script's start-up path (SIGTERM/SIGINT/MaxRuntimeInSeconds: SIGTERM to the group, SIGKILL after
   the grace period);
6. at the end of every job, whatever failed before: abandon a channel listing nobody took, drain
   the logs, stop the Pipe feeders, upload model.tar.gz and output.tar.gz, finish the checkpoint
   sync, close telemetry, write the success or failure file, ship this host's report; exit with
   the user's code (TorchBay errors: agent/errors.py).

A stop request between two steps before the script starts ends the job there. This module never
imports torch, and boto3 only when an s3:// URI is used.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from agent.code import fetch_code, install_requirements
from agent.data import DataHandle, Listing, Staging
from agent.distributed import (
    Exchange,
    LaunchPlan,
    first_failure,
    peer_reason,
    plan_launch,
    start_exchange,
    wait_for_hosts,
)
from agent.environment import EntryPoint, resolve_entry_point, user_args, user_environment
from agent.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    DiskFullError,
    StoppedOnRequest,
    StorageError,
    TorchBayError,
    exit_code_for,
)
from agent.job import Job, Layout, load_job, write_config_files
from agent.process import ProcessGroup, StopRequest, check_command_size, supervise
from agent.redact import RedactingFilter, Redactor
from agent.settings import Settings, read_settings
from agent.storage import (
    JobStorage,
    redact,
    write_text_atomically,
)
from agent.telemetry.agentlog import AgentLogHandler
from agent.telemetry.capture import LogCapture
from agent.uploads import DeadlineStorage, put_until

if TYPE_CHECKING:  # imported where used: after the script started
    from agent.sync import LiveSync
    from agent.telemetry.service import Telemetry

__all__ = ["FAILURE_REASON_MAX", "failure_reason", "main", "parse_args"]

FAILURE_REASON_MAX = 1024  # SageMaker's FailureReason cap
_STDERR_TAIL_LINES = 20
_LOG_FORMAT = "%(asctime)s torchbay %(levelname)s %(message)s"
_EXCEPTION_LINE = re.compile(
    r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning|Failure|Fault)\b[\w.]*)"
    r"(?::\s?(.*))?$"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """``torchbay train [--job SPEC]``."""
    parser = argparse.ArgumentParser(
        prog="torchbay train",
        description="Run a SageMaker-shaped training job: the job spec (or the config files under "
        "the root), the user's code, data, process supervision, outputs and the failure report.",
    )
    parser.add_argument(
        "--job",
        metavar="SPEC",
        default=None,
        help="a CreateTrainingJob-shaped JSON file, or the JSON itself (default: TORCHBAY_JOB, "
        "else the config files under TORCHBAY_ROOT/input/config)",
    )
    return parser.parse_args(list(argv) if argv is not None else None)


class _Stopped(Exception):
    """A stop signal arrived before the user's script started (internal to this module)."""


def failure_reason(
    exit_code: int,
    stderr_tail: Sequence[str],
    *,
    argv: Sequence[str] = (),
    stopped: str | None = None,
) -> str:
    """A readable reason for a failed user process, at most FAILURE_REASON_MAX characters.

    ``<ExcType>: <message>`` (found in the stderr tail) first, then the exit code and how it ended,
    then as many of the last stderr lines as fit.
    """
    head: list[str] = []
    exception = _find_exception(stderr_tail)
    if exception:
        head.append(exception)
    how = f"exit code {exit_code}"
    if exit_code > 128 and exit_code - 128 < 65:
        try:
            how += f" (killed by {signal.Signals(exit_code - 128).name})"
        except ValueError:
            pass
        if exit_code == 128 + signal.SIGKILL and not stopped:
            how += (
                "; SIGKILL without a stop request often means the kernel's OOM killer: check "
                "memory use"
            )
    if stopped:
        how += f"; {stopped}"
    program = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(argv[:3]))
    head.append(
        f"The training script failed with {how}" + (f" ({program} ...)" if program else "") + "."
    )
    text = "\n".join(head)
    tail = [line.rstrip() for line in stderr_tail if line.strip()]
    if tail:
        room = FAILURE_REASON_MAX - len(text) - len("\nLast lines of stderr:\n")
        kept: list[str] = []
        for line in reversed(tail):
            if room - (len(line) + 1) < 0:
                break
            kept.insert(0, line)
            room -= len(line) + 1
        if kept:
            text += "\nLast lines of stderr:\n" + "\n".join(kept)
    return text[:FAILURE_REASON_MAX]


def _find_exception(lines: Sequence[str]) -> str | None:
    """The ``Type: message`` line of the last Python traceback in ``lines``, if any."""
    last_traceback = max(
        (i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line),
        default=None,
    )
    candidates = lines[last_traceback + 1 :] if last_traceback is not None else lines
    found = None
    for line in candidates:
        text = line.rstrip()
        if text and not text[0].isspace():
            match = _EXCEPTION_LINE.match(text)
            if match:
                found = text
            elif (
                last_traceback is not None
                and found is None
                and ":" in text
                and not text.startswith("During")
            ):
                found = text  # a custom exception class without a conventional suffix
    if found is None and last_traceback is not None:
        for line in reversed(candidates):
            if line.strip() and not line[0].isspace():
                return line.strip()
    return found


def _configure_logging(level: str, redactor: Redactor | None = None) -> logging.Logger:
    log = logging.getLogger("torchbay")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    if redactor is not None:  # every agent line: secrets masked, length capped
        handler.addFilter(RedactingFilter(redactor))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    return log


def _make_tarball(folder: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(dest, "w:gz") as archive:
            if folder.is_dir():
                for child in sorted(folder.iterdir()):
                    archive.add(str(child), arcname=child.name, recursive=True)
    except OSError as err:
        dest.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk full while packing {folder} into {dest}; free space on {dest.parent}"
            ) from err
        raise StorageError(
            f"cannot pack {folder} into {dest}: {err}; check the files' permissions"
        ) from err


def _line_buffered(argv: Sequence[str], enabled: bool, log: logging.Logger) -> list[str]:
    """``argv`` under ``stdbuf -oL -eL`` (C stdio line-buffered in the child and its children) when
    asked and found.

    The child's output goes to files, where C stdio would otherwise buffer 4 KiB blocks that a crash
    loses.
    """
    if not enabled:
        return list(argv)
    stdbuf = shutil.which("stdbuf")
    if stdbuf is None:
        log.info(
            "stdbuf not found: C-level output of the script is block-buffered (Python output is "
            "not)"
        )
        return list(argv)
    return [stdbuf, "-oL", "-eL", *argv]


class _Lifecycle:
    """One train run: ``run`` calls the steps in order and returns the exit code; every step after
    load_job ends in ``_finish``."""

    def __init__(
        self,
        job: Job,
        *,
        log: logging.Logger,
        stop: StopRequest,
        out: BinaryIO,
        redactor: Redactor | None = None,
    ) -> None:
        self.job = job
        self.log = log
        self.stop = stop
        self.out = out
        self.redactor = redactor or Redactor(job.settings.train.secret_names)
        # The job's one storage, for every step (its S3 client is made on first use).
        self.storage = JobStorage.from_settings(job.settings)
        self.exit_code: int | None = None
        self.reason: str | None = None
        # What the steps started, for the steps after them and for the end of the job.
        self._agent_log: AgentLogHandler | None = None
        self._exchange: Exchange | None = None
        self._listing: Listing | None = None
        self._staging: Staging | None = None
        self._data: DataHandle | None = None
        self._sync: LiveSync | None = None
        self._plan: LaunchPlan | None = None
        self._capture: LogCapture | None = None
        self._script_started = False
        self._watching = False
        self._log_storage: DeadlineStorage | None = None
        self._telemetry: Telemetry | None = None

    def run(self) -> int:
        self._attach_job_log()
        # The listing waits on S3 while the folders are made, the config files written and the
        # code fetched: started here, the channel is listed about 30 ms sooner (2,000 keys).
        self._start_listing()
        self._prepare_folders()
        self._start_exchange()
        try:
            self._until_the_script_ends()
        except _Stopped as stopped:
            signum = self.stop.signum or signal.SIGTERM
            self.exit_code = 128 + signum
            self.reason = (
                f"stopped by {signal.Signals(signum).name} during {stopped}, before the script "
                "started"
            )
            self.log.warning("%s", self.reason)
        except TorchBayError as err:
            self.exit_code = err.exit_code
            self.reason = f"{type(err).__name__}: {err}"
            self.log.error("%s (exit code %d)", self.reason, err.exit_code)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            where = err.filename or f"a file under {self.job.layout.root}"
            disk = DiskFullError(
                f"disk full: {err.strerror} ({where}); free space or give the job a bigger volume"
            )
            self.exit_code, self.reason = disk.exit_code, f"DiskFullError: {disk}"
            self.log.error("%s (exit code %d)", self.reason, disk.exit_code)
        except Exception as err:  # the process top level: log it and still upload what exists
            self.log.exception("internal error: %s", err)
            self.exit_code = EXIT_INTERNAL
            self.reason = (
                f"TorchBay internal error: {type(err).__name__}: {redact(str(err))}; please "
                "report it"
            )
        self._close_exchange()
        self._finish()
        assert self.exit_code is not None
        return self.exit_code

    def _until_the_script_ends(self) -> None:
        """The steps up to the end of the script; a stop request between two ends the run."""
        self._write_config_files()
        self._check_stop("setup")
        self._fetch_code()
        self._check_stop("the code download")
        self._start_staging()
        self._install_requirements()
        self._check_stop("pip install")
        entry = resolve_entry_point(self.job)
        self._stage_channels()
        self._restore_checkpoints()
        self._wait_for_hosts()
        self._check_stop("the wait for hosts")
        plan = self._plan_launch(entry)
        outputs = self._start_log_capture(plan)
        group = self._start_script(plan, entry, outputs)
        self._wait_for_script(group)  # live sync and telemetry start at its first tick

    def _check_stop(self, step: str) -> None:
        if self.stop.requested:
            raise _Stopped(step)

    # --- the steps before the script ------------------------------------------------------------
    def _prepare_folders(self) -> None:
        """The layout's folders; no status file of an earlier run; room kept for this one's."""
        layout = self.job.layout
        for folder in (
            layout.model_dir,
            layout.output_data_dir,
            layout.intermediate_dir,
            layout.code_dir,
            layout.data_dir,
            layout.agent_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in (layout.failure_file, layout.success_file):
            stale.unlink(missing_ok=True)
        _reserve_room(layout.agent_dir / _RESERVE_NAME)

    def _attach_job_log(self) -> None:
        """The agent's own lines go to the job log too, tagged as the agent's
        (agent/telemetry/agentlog.py)."""
        job, settings = self.job, self.job.settings
        try:
            self._agent_log = AgentLogHandler(
                job.layout.job_log_file,
                host=job.resource.current_host,
                tag_format=settings.telemetry.log_tag,
                json_lines=settings.telemetry.log_json,
                fmt=logging.Formatter(_LOG_FORMAT),
            )
        except OSError as err:
            self.log.warning(
                "the agent's lines will not be in the job log: cannot open %s (%s)",
                job.layout.job_log_file,
                err,
            )
        else:
            self.log.addHandler(self._agent_log)
        self.log.info(
            "job %s on %s (%d host(s)); root %s%s",
            job.name,
            job.resource.current_host,
            job.resource.host_count,
            job.layout.root,
            " (SageMaker: config and data in place)" if job.on_sagemaker else "",
        )

    def _start_exchange(self) -> None:
        """The identity exchange with the other hosts of a multi-host job
        (agent.distributed.exchange)."""
        if self.job.cluster is not None and self.job.cluster.multi_host:
            self._exchange = start_exchange(self.job, log=self.log, stop=self.stop)

    def _write_config_files(self) -> None:
        if not self.job.on_sagemaker:  # on SageMaker the platform wrote them
            write_config_files(self.job)

    def _start_listing(self) -> None:
        """List the channels while the job is set up and its code fetched (a big prefix takes
        seconds to minutes); the staging takes the result."""
        if any(channel.uri is not None for channel in self.job.channels):
            self._listing = Listing(self.job, log=self.log, storages=self.storage)

    def _fetch_code(self) -> None:
        try:
            fetch_code(
                self.job, log=self.log, storage_for=self.storage.for_uri, cancel=self.stop.event
            )
        except StoppedOnRequest:  # DownloadStopped: a big source archive ends on a signal
            raise _Stopped("the code download") from None

    def _start_staging(self) -> None:
        """Stage the channels on a thread while the requirements install, instead of after: the
        downloads and pip overlap. _stage_channels takes the result; a failed install cancels it
        (_finish)."""
        if self._listing is not None:
            self._staging = Staging(
                self.job,
                log=self.log,
                storages=self.storage,
                listing=self._listing,
                stop=self._stop_requested,
            )

    def _install_requirements(self) -> None:
        install_requirements(self.job, log=self.log, stop=self.stop)

    def _stage_channels(self) -> None:
        """Wait for the staged File channels and the started Pipe feeders; on SageMaker the data
        is in place."""
        if self._staging is None:
            return
        staging, self._staging = self._staging, None
        try:
            self._data = staging.result()
        except StoppedOnRequest:  # StagingStopped: a long listing or staging ends on a signal
            raise _Stopped("data staging") from None
        self._check_stop("data staging")

    def _stop_requested(self) -> bool:
        return self.stop.requested

    def _restore_checkpoints(self) -> None:
        uri = self.job.checkpoint_uri
        if not uri:
            return
        try:
            restored = self._live_sync().restore(self.stop.event)
        except StoppedOnRequest:  # RestoreStopped: a signal ends the files under way, starts none
            raise _Stopped("checkpoint restore") from None
        if restored:
            self.log.info("restored %d checkpoint file(s) from %s", restored, redact(uri))
        self._check_stop("checkpoint restore")

    def _wait_for_hosts(self) -> None:
        wait_for_hosts(
            self.job,
            log=self.log,
            exchange=self._exchange,
            should_stop=self._stop_requested,
        )

    def _plan_launch(self, entry: EntryPoint) -> LaunchPlan:
        self._plan = plan_launch(self.job, entry, user_args(self.job), log=self.log)
        return self._plan

    def _start_log_capture(self, plan: LaunchPlan) -> tuple[Path, Path]:
        """Tail the ranks' files into the job log; returns the stdout and stderr files of this
        host's first rank (the script's own, or torchrun's)."""
        job = self.job
        self._capture = capture = LogCapture(
            host=job.resource.current_host,
            log_dir=job.layout.agent_dir / "logs",
            out=self.out,
            job_log=job.layout.job_log_file,
            settings=job.settings,
            metric_definitions=job.metric_definitions,
            metrics_file=job.layout.metrics_file,
            tensorboard_dir=job.tensorboard_local_path,
            log=self.log,
            **({"mask": self.redactor.data} if self.redactor.active else {}),
        )
        if plan.torchrun_log_dir is not None:
            capture.add_torchrun_dir(plan.torchrun_log_dir, plan.rank_base)
        outputs = capture.files_for(plan.rank_base)
        capture.start()
        return outputs

    def _start_script(
        self, plan: LaunchPlan, entry: EntryPoint, outputs: tuple[Path, Path]
    ) -> ProcessGroup:
        """The user's process group under the orphan guard, its output in the captured files."""
        job = self.job
        env = user_environment(job, entry, plan.env)
        check_command_size(plan.argv, env, job.hyperparameters)
        shown = [
            word if len(word) <= 256 else f"{word[:64]}...({len(word)} chars)"
            for word in self.redactor.argv(plan.argv)
        ]
        self.log.info("starting %s (cwd %s)", " ".join(shown), entry.code_dir)
        argv = _line_buffered(plan.argv, job.settings.train.line_buffer, self.log)
        stdout_path, stderr_path = outputs
        with open(stdout_path, "ab") as child_out, open(stderr_path, "ab") as child_err:
            group = ProcessGroup(
                argv,
                env=env,
                cwd=entry.code_dir,
                stdout=child_out,
                stderr=child_err,
                guard=True,
                failure_file=job.layout.failure_file,
                log=self.log,
            ).start()
        self._script_started = True
        return group

    # --- while the script runs ------------------------------------------------------------------
    def _live_sync(self) -> LiveSync:
        """The job's one LiveSync, made by the first step that needs it (the checkpoint restore, or
        the start of the watch)."""
        if self._sync is None:
            from agent.sync import LiveSync  # watchdog: after the script started, unless restoring

            # The job's storage makes its S3 client on first use, so boto3 is not imported
            # while the script starts.
            self._sync = LiveSync(self.job, log=self.log, storages=self.storage)
        return self._sync

    def _start_watching(self, group: ProcessGroup, *, ended: bool = False) -> None:
        """Start live sync and telemetry, once: at the wait's first tick, so that their imports and
        threads are off the script's start-up path (files written before the watch begins are
        picked up by LiveSync.start itself), or after a script that ended before it (``ended``:
        live sync uploads what is there without watching for more)."""
        if self._watching:
            return
        self._watching = True
        self._live_sync().start(watch=not ended)
        self._start_telemetry(group)

    def _start_telemetry(self, group: ProcessGroup) -> None:
        from agent.telemetry.service import Telemetry  # tempfile, the shipper: after the start

        uri = self.job.job_output_uri
        if uri:
            self._log_storage = DeadlineStorage(
                lambda: self.storage.for_uploads(uri),
                log=self.log,
                part_size=self.job.settings.train.upload_part_size,
            )
        self._telemetry = Telemetry(self.job, root_pid=lambda: group.pid, storage=self._log_storage)
        self._telemetry.start()

    def _wait_for_script(self, group: ProcessGroup) -> None:
        job = self.job
        result = supervise(
            group,
            stop=self.stop,
            grace=job.settings.train.grace_period,
            max_runtime=job.max_runtime,
            on_tick=lambda: self._start_watching(group),
        )
        # A script that ended within the first tick is synced and reported all the same.
        self._start_watching(group, ended=True)
        self.exit_code = result.exit_code
        stopped = None
        if result.stopped_by == "signal":
            name = signal.Signals(result.signum or signal.SIGTERM).name
            stopped = f"the agent got {name} and stopped the script"
        elif result.stopped_by == "max_runtime":
            stopped = (
                f"MaxRuntimeInSeconds ({job.max_runtime:g} s) was reached and the script was "
                "stopped"
            )
        if stopped:
            stopped += " (SIGKILL after the grace period)" if result.killed else ""
            self.log.warning("%s; exit code %d", stopped, result.exit_code)
        self.log.info(
            "the script ended with exit code %d after %.1f s", result.exit_code, result.duration
        )
        if result.exit_code != EXIT_OK:
            if self._capture is not None:  # the stderr tail complete before it is read
                self._capture.close()
            self.reason = self._user_failure(result.exit_code, stopped)

    def _user_failure(self, exit_code: int, stopped: str | None) -> str:
        plan = self._plan
        rank = plan.rank_base if plan is not None else 0
        tail = self._capture.stderr_tail(rank, _STDERR_TAIL_LINES) if self._capture else []
        argv = list(plan.argv) if plan is not None else []
        reason = failure_reason(exit_code, tail, argv=argv, stopped=stopped)
        if plan is not None and (plan.torchrun_log_dir is not None or plan.error_file is not None):
            first = first_failure(plan)
            if first:
                reason = (first + "\n" + reason)[:FAILURE_REASON_MAX]
        return reason

    def _close_exchange(self) -> None:
        """The other hosts learn at once how this one ended; a peer's failure leads the reason."""
        if self._exchange is not None:
            self._exchange.close(self.exit_code, self.reason)
            self.reason = peer_reason(
                self._exchange, self.job.resource.current_host, self.exit_code, self.reason
            )

    # --- the end of every job -------------------------------------------------------------------
    def _finish(self) -> None:
        """Every end-of-job step runs, whatever failed before it; then the status file is written
        and this host's report shipped."""
        deadline = time.monotonic() + self.job.settings.train.upload_timeout
        capture, data, sync = self._capture, self._data, self._sync
        if self._staging is not None:  # a job that failed before it took its data
            self._end_step("cancelling the staging", self._cancel_staging)
        if self._listing is not None:  # nobody waits for it
            self._listing.abandon()
        if capture is not None:
            self._end_step("draining the logs", capture.close)
        if data is not None:
            self._end_step("stopping the Pipe feeders", lambda: data.stop(10.0))
        deadlines = [deadline]

        def upload_outputs() -> None:
            started = self._upload_outputs(deadline)
            if started is not None:
                deadlines.append(started)

        self._end_step("uploading the outputs", upload_outputs)
        deadline = max(deadlines)
        if sync is not None:
            self._end_step("uploading the checkpoints", lambda: self._finish_sync(sync, deadline))
        if self._log_storage is not None:  # the final job log and metrics uploads retry too
            self._log_storage.set_deadline(deadline)
        if self._telemetry is not None:
            self._end_step("closing telemetry", self._telemetry.close)
        self._write_status()
        self._ship_report()

    def _cancel_staging(self) -> None:
        assert self._staging is not None
        finished = self._staging.cancel(10.0)
        if finished is not None:  # staged before the failure: its Pipe feeders stop here
            finished.stop(5.0)

    def _end_step(self, what: str, action: Callable[[], object]) -> None:
        # The end of a job is a top level of its own: one failing step must not skip the others or
        # the status file, so any exception is logged and (for a job that had succeeded) fails it.
        try:
            action()
        except TorchBayError as err:
            self._fail_late(err)
        except Exception as err:
            self.log.exception("internal error while %s: %s", what, err)
            self._fail_late(
                TorchBayError(
                    f"internal error while {what}: {type(err).__name__}: {redact(str(err))}; "
                    "please report it with the log"
                )
            )

    def _fail_late(self, err: TorchBayError) -> None:
        """An error after the script ended: it fails a job that had succeeded; otherwise it is
        logged."""
        self.log.error("%s", err)
        if self.exit_code in (None, EXIT_OK):
            self.exit_code = err.exit_code
            self.reason = f"{type(err).__name__}: {err}"

    def _upload_outputs(self, deadline: float) -> float | None:
        """Pack and upload model.tar.gz and output.tar.gz; returns the upload deadline, which starts
        once they are packed (packing is local work, not upload time)."""
        job = self.job
        base = job.job_output_uri
        if not base or job.on_sagemaker:
            return None
        node_rank = self._plan.rank_base if self._plan is not None else job.resource.host_index
        if node_rank != 0:
            # Every host would write the same two keys; the first host's model and outputs are the
            # job's.
            self.log.info(
                "model/ and output/data/ are uploaded by the first host, not by %s (rank %d)",
                job.resource.current_host,
                node_rank,
            )
            return None
        layout = job.layout
        missed: list[str] = []
        packed: list[tuple[Path, Path, str]] = []
        try:
            for folder, name in (
                (layout.model_dir, "model.tar.gz"),
                (layout.output_data_dir, "output.tar.gz"),
            ):
                archive = layout.agent_dir / "upload" / name
                try:
                    _make_tarball(folder, archive)
                except TorchBayError as err:
                    self._fail_late(err)
                    continue
                packed.append((folder, archive, f"{base}/{name}"))
            # The deadline starts once the archives are packed; a job whose script never ran (a bad
            # spec, an endpoint that never answered) tries once instead of waiting out the deadline
            # for empty folders.
            deadline = (
                max(deadline, time.monotonic() + job.settings.train.upload_timeout)
                if self._script_started
                else time.monotonic()
            )
            for folder, archive, uri in packed:
                try:
                    self._upload_one(folder, archive, uri, deadline)
                except StorageError as err:
                    self.log.error("%s", err)
                    missed.append(f"{archive.name} ({redact(uri)})")
                except TorchBayError as err:
                    self._fail_late(err)
        finally:
            for _folder, archive, _uri in packed:
                archive.unlink(missing_ok=True)
        if missed:
            raise StorageError(
                f"not uploaded: {' and '.join(missed)}; the upload deadline "
                f"(TORCHBAY_UPLOAD_TIMEOUT={job.settings.train.upload_timeout:g} s) passed or the "
                "upload failed for good (see the log); check the endpoint, or raise "
                "TORCHBAY_UPLOAD_TIMEOUT"
            )
        return deadline

    def _upload_one(self, folder: Path, archive: Path, uri: str, deadline: float) -> None:
        put_until(
            self.storage.for_uploads(uri),
            archive,
            uri,
            deadline,
            log=self.log,
            part_size=self.job.settings.train.upload_part_size,
            what=archive.name,
        )
        self.log.info("uploaded %s (%d bytes) to %s", folder, archive.stat().st_size, redact(uri))

    def _finish_sync(self, sync: LiveSync, deadline: float) -> None:
        left = sync.close(deadline)
        if left:
            raise StorageError(
                f"{len(left)} checkpoint/output file(s) were not uploaded by the deadline "
                f"(first: {left[0]}); check the endpoint, or raise TORCHBAY_UPLOAD_TIMEOUT"
            )

    def _write_status(self) -> None:
        layout = self.job.layout
        reserve = layout.agent_dir / _RESERVE_NAME
        if self.exit_code == EXIT_OK:
            if not layout.failure_file.exists():
                _write_small(layout.success_file, "", reserve)
            reserve.unlink(missing_ok=True)
            return
        if layout.failure_file.exists():
            self.log.info("keeping the failure file the script wrote: %s", layout.failure_file)
            reserve.unlink(missing_ok=True)
            return
        reason = self.redactor.text(
            redact(self.reason or f"the job failed with exit code {self.exit_code}")
        )
        try:
            _write_small(layout.failure_file, reason[:FAILURE_REASON_MAX], reserve)
        except OSError as err:
            self.log.error(
                "cannot write the failure file %s (%s); the reason was: %s",
                layout.failure_file,
                err,
                reason,
            )
            return
        self.log.error(
            "failure reason written to %s:\n%s", layout.failure_file, reason[:FAILURE_REASON_MAX]
        )

    def _ship_report(self) -> None:
        """This host's job log and failure/success file beside the outputs
        (agent/telemetry/shipping.py)."""
        base = self.job.job_output_uri
        try:
            if base and not self.job.on_sagemaker:
                from agent.telemetry.shipping import ship_host_report  # tempfile, gzip: at the end

                layout = self.job.layout
                # the deadline-bound storage of the final uploads when the script ran, else one try
                storage = self._log_storage or self.storage.for_uploads(base)
                ship_host_report(
                    storage,
                    base,
                    self.job.resource.current_host,
                    job_log=layout.job_log_file,
                    failure_file=layout.failure_file,
                    success_file=layout.success_file,
                    log=self.log,
                )
        except (TorchBayError, OSError) as err:  # the report never changes the job's exit code
            self.log.warning("could not upload this host's job log and status file: %s", err)
        finally:
            if self._agent_log is not None:
                self.log.removeHandler(self._agent_log)
                self._agent_log.close()
                self._agent_log = None


_RESERVE_NAME = "failure.reserve"
_RESERVE_BYTES = 64 * 1024


def _reserve_room(path: Path) -> None:
    """Hold some disk space for the status file: a full disk still gets a readable failure
    file."""
    try:
        with open(path, "wb") as handle:
            handle.write(b"\0" * _RESERVE_BYTES)
    except OSError:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _write_small(path: Path, text: str, reserve: Path) -> None:
    """Write a status file; on a full disk give back the reserved room and try again, then in
    place."""
    try:
        write_text_atomically(path, text)
        return
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    reserve.unlink(missing_ok=True)
    try:
        write_text_atomically(path, text)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)


def _early_failure(
    settings: Settings | None,
    err: TorchBayError,
    log: logging.Logger,
    redactor: Redactor | None = None,
) -> None:
    """Write the failure file for an error before the job could be read, when the root is known."""
    if settings is None:  # a bad setting: no root to trust
        return
    failure_file = Layout(Path(settings.general.root)).failure_file
    try:
        text = f"{type(err).__name__}: {err}"
        write_text_atomically(
            failure_file, (redactor.text(text) if redactor else text)[:FAILURE_REASON_MAX]
        )
    except OSError as os_err:
        log.warning("cannot write the failure file %s: %s", failure_file, os_err)


def main(
    argv: Sequence[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    out: BinaryIO | None = None,
) -> int:
    """Run one training job; returns the exit code (the user's, or a TorchBay error's)."""
    args = parse_args(argv)
    env = dict(os.environ) if env is None else dict(env)
    redactor = Redactor()
    redactor.learn(env)
    try:
        settings: Settings | None = read_settings(env)
    except TorchBayError:  # load_job reports the bad setting, through a log at the default level
        settings = None
    log = _configure_logging(
        settings.general.log_level if settings is not None else "INFO", redactor
    )
    stop = StopRequest()
    try:
        stop.install()
    except ValueError:  # not the main thread (a test driving main() from a thread): no handlers
        pass
    try:
        try:
            job = load_job(env, args.job)
        except TorchBayError as err:
            log.error("%s: %s (exit code %d)", type(err).__name__, err, err.exit_code)
            _early_failure(settings, err, log, redactor)
            return err.exit_code
        redactor.set_pattern(job.settings.train.secret_names)
        for named in (job.base_env, job.environment, job.hyperparameters):
            redactor.learn(named)
        return _Lifecycle(
            job, log=log, stop=stop, out=out or sys.stdout.buffer, redactor=redactor
        ).run()
    except Exception as err:  # the process top level
        log.exception("internal error: %s", err)
        return exit_code_for(err)
    finally:
        stop.restore()
