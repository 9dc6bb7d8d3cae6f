"""Making the boto3 S3 client, and turning botocore's exceptions into the failure kinds of
agent.storage.retry."""

from __future__ import annotations

from typing import Any

from agent.errors import BucketMissing, EndpointUnreachable, ObjectMissing, StorageError
from agent.storage.base import parse_uri, redact
from agent.storage.retry import TransientError, error_code, retryable

__all__ = ["make_s3_client", "translate_s3_error"]

_CONNECTION_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ProtocolError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "RemoteDisconnected",
        "ConnectionResetError",
    }
)
_NEVER_RETRIED = frozenset(
    {"NoCredentialsError", "ParamValidationError", "PartialCredentialsError"}
)


def translate_s3_error(
    err: BaseException, uri: str, where: str = "the S3 endpoint"
) -> StorageError:
    """Turn a botocore exception into the StorageError of its kind (agent.storage.retry), naming
    the URI, the endpoint and the fix."""
    if isinstance(err, StorageError):
        return err
    name = type(err).__name__
    code = error_code(err)
    if name in _CONNECTION_ERRORS or "Could not connect" in str(err):
        return EndpointUnreachable(
            f"cannot reach {where} for {uri} ({name}); check AWS_ENDPOINT_URL and that the "
            "server is up"
        )
    if code == "NoSuchBucket":
        bucket = parse_uri(uri).bucket if uri.startswith("s3://") else uri
        return BucketMissing(
            f"bucket {bucket!r} does not exist at {where} (for {uri}); create it or fix the URI"
        )
    if code in ("NoSuchKey", "404", "NotFound"):
        return ObjectMissing(f"{uri} does not exist at {where}; check the key")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(
            f"access denied to {uri} at {where} ({code}); check the credentials and the bucket "
            "policy"
        )
    if name == "NoCredentialsError":
        return StorageError(
            f"no AWS credentials found for {uri}; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a "
            "profile or a role"
        )
    text = (
        f"S3 request for {uri} at {where} failed: {redact(code or name)}: {redact(str(err))[:300]}"
    )
    if name in _NEVER_RETRIED or not retryable(err):
        return StorageError(text)
    return TransientError(text)


def make_s3_client(
    endpoint_url: str | None = None,
    max_pool_connections: int = 32,
    *,
    max_attempts: int = 2,
    connect_timeout: float = 5,
) -> Any:
    """A boto3 S3 client with a connection pool sized for threads and few built-in retries (the
    backoff is agent.storage.retry's).

    The endpoint comes from ``endpoint_url``, else the standard AWS settings (``AWS_ENDPOINT_URL``,
    ``AWS_ENDPOINT_URL_S3``) that boto3 reads itself.
    """
    # boto3 and botocore (~220 ms): only once a job touches an s3:// URI
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url or None, config=config)
