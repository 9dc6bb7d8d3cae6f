"""Every error TorchBay raises on purpose, with the exit code each one ends a job with.

A message says what failed, the value seen, and what to do about it. Exit codes
follow sysexits(3) so they never collide with the 0/1/2 a user script returns
or with 128+N for signal N.
"""

from __future__ import annotations

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_OK",
    "ArchiveError",
    "BucketMissing",
    "ChannelError",
    "ConfigError",
    "DiskFullError",
    "DistributedError",
    "EndpointUnreachable",
    "EntryPointError",
    "ExportError",
    "InstallError",
    "JobSpecError",
    "ModelLoadError",
    "ObjectMissing",
    "PackageConflictError",
    "RequestError",
    "StoppedOnRequest",
    "StorageError",
    "TorchBayError",
    "TransformError",
    "UnsafePathError",
    "UploadIncomplete",
    "exit_code_for",
]

EXIT_OK = 0
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug in TorchBay itself


class StoppedOnRequest(Exception):
    """A step ended early because the agent was asked to stop (a signal): no failure of its own;
    the train lifecycle ends the job as stopped (128+N, the step named in the failure file)."""


class TorchBayError(Exception):
    """Root of every error TorchBay raises on purpose.

    ``exit_code`` is what the agent exits with when this error ends a job.
    """

    exit_code: int = EXIT_INTERNAL
    kind: str = "TorchBayError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(TorchBayError):
    """A config file under input/config, a setting or an environment variable is malformed or
    missing."""

    exit_code = 78  # EX_CONFIG


class JobSpecError(TorchBayError):
    """The job spec (CreateTrainingJob-shaped JSON) has an unknown key, a wrong type or a missing
    field."""

    exit_code = 65  # EX_DATAERR


class ChannelError(TorchBayError):
    """A data channel is unknown, empty or cannot be staged."""

    exit_code = 66  # EX_NOINPUT


class StorageError(TorchBayError):
    """An s3:// or file:// operation failed."""

    exit_code = 69  # EX_UNAVAILABLE


class EndpointUnreachable(StorageError):
    """The S3 endpoint did not answer."""

    exit_code = 69


class BucketMissing(StorageError):
    """The bucket named in a URI does not exist."""

    exit_code = 68  # EX_NOHOST


class ObjectMissing(StorageError):
    """The object named in a URI does not exist."""

    exit_code = 66


class UnsafePathError(TorchBayError):
    """An object key or archive member would be written outside its target folder."""

    exit_code = 65


class EntryPointError(TorchBayError):
    """The user's entry point is missing or cannot be run."""

    exit_code = 72  # EX_OSFILE


class InstallError(TorchBayError):
    """Installing the user's requirements or package failed."""

    exit_code = 75  # EX_TEMPFAIL


class PackageConflictError(InstallError):
    """The user's requirements would replace a package the agent itself needs (nothing was
    installed)."""

    def __init__(
        self, message: str, *, package: str = "", asked: str = "", needed: str = ""
    ) -> None:
        super().__init__(message)
        self.package = package
        self.asked = asked
        self.needed = needed


class DiskFullError(TorchBayError):
    """A write failed because the disk is full."""

    exit_code = 74  # EX_IOERR


class DistributedError(TorchBayError):
    """Hosts could not be found, resolved or reached."""

    exit_code = 68  # EX_NOHOST


class ModelLoadError(TorchBayError):
    """The model could not be found or loaded for serving."""

    exit_code = 3  # gunicorn's WORKER_BOOT_ERROR


class ExportError(TorchBayError):
    """``torchbay export`` could not load, export or compile the module it was given."""

    exit_code = 65  # EX_DATAERR


class RequestError(TorchBayError):
    """One inference request failed; ``status`` is the HTTP status its JSON reply carries (never an
    exit)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ArchiveError(TorchBayError):
    """An archive is truncated or corrupt, or over a size or member-count limit."""

    exit_code = 65  # EX_DATAERR


class TransformError(TorchBayError):
    """A batch transform job could not transform an object or a record (after its retries)."""

    exit_code = 65  # EX_DATAERR


class UploadIncomplete(StorageError):
    """An end-of-job upload did not finish by the upload deadline (TORCHBAY_UPLOAD_TIMEOUT)."""

    exit_code = 69


def exit_code_for(error: BaseException) -> int:
    """The exit code a job ends with when ``error`` escapes to the top level."""
    if isinstance(error, TorchBayError):
        return error.exit_code
    return EXIT_INTERNAL
