"""The flask app: ``/ping``, ``/invocations``, ``/execution-parameters`` and ``/metrics``.

Every error is a JSON body ``{"code": N, "error": "<phrase>", "message": "<reason>"}`` with no
traceback; tracebacks of model errors go to the log only.
"""

from __future__ import annotations

import http
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.exceptions import HTTPException

from agent.errors import RequestError
from agent.serving import codecs
from agent.serving.batching import Runner, set_torch_threads
from agent.serving.config import ServeConfig
from agent.serving.limits import DecodeGate, Limits, check_decoded_size, release_memory
from agent.serving.model import ModelHandler
from agent.serving.ratelog import RateLimitedLog
from agent.serving.shared import SharedState

__all__ = ["Serving", "count_requests", "create_app", "json_error", "status_phrase"]


@dataclass(frozen=True)
class _Transform:
    body: bytes
    content_type: str
    accept: str


class Serving:
    """What one worker serves with: the config, the loaded handler, the shared state and, after
    fork, a runner."""

    def __init__(
        self,
        config: ServeConfig,
        handler: ModelHandler,
        state: SharedState,
        log: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.state = state
        self.log = log or logging.getLogger("torchbay.serve")
        self.runner: Runner | None = None
        self.busy_since: float | None = (
            None  # when the model call running now began (monotonic), else None
        )

    def start_worker(self) -> None:
        """In a freshly forked worker: start the inference thread."""
        batch = (
            self.config.batch_size
            if not self.handler.has_transform and self.handler.batchable
            else 1
        )
        self.runner = Runner(
            self._run_one,
            self._run_batch if batch > 1 else None,
            max_batch=batch,
            max_delay=self.config.batch_delay,
            on_batch=self.state.record_batch,
            log=self.log,
            thread_init=partial(set_torch_threads, self.config.torch_threads),
        )
        self.runner.start()

    def stop_worker(self) -> None:
        if self.runner is not None:
            self.runner.stop(timeout=self.config.grace_period)

    def _run_one(self, data: Any) -> Any:
        self.busy_since = time.monotonic()
        try:
            if isinstance(data, _Transform):
                return self.handler.transform(data.body, data.content_type, data.accept)
            return self.handler.predict(data)
        finally:
            self.busy_since = None

    def _run_batch(self, inputs: Any) -> Any:
        self.busy_since = time.monotonic()
        try:
            return self.handler.predict_batch(inputs)
        finally:
            self.busy_since = None


def create_app(serving: Serving) -> Callable[..., Iterable[bytes]]:
    """The WSGI application (flask, wrapped to count every response in the shared metrics)."""
    app = Flask("torchbay.serve")
    config = serving.config
    registry = _registry(serving.state)

    def error(status: int, message: str) -> Response:
        _, body, content_type, _ = json_error(status, message)
        return Response(body, status=status, content_type=content_type)

    @app.get("/ping")
    def ping() -> Response:
        if serving.runner is None or not serving.handler.loaded:
            return error(503, "the model is not loaded in this worker yet")
        healthy, reason = serving.state.health(config.workers, config.crash_window)
        if not healthy:
            return Response(
                json.dumps({"status": "Unhealthy", "reason": reason}),
                status=503,
                content_type=codecs.JSON,
            )
        return Response('{"status": "Healthy"}', status=200, content_type=codecs.JSON)

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return Response(
            json.dumps(config.execution_parameters()), status=200, content_type=codecs.JSON
        )

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), status=200, content_type=CONTENT_TYPE_LATEST)

    @app.post("/invocations")
    def invocations() -> (
        Response
    ):  # routed so other methods get 405; POSTs are answered in `counted`
        status, payload, out_type, close = invoke(request.environ)
        response = Response(payload, status=status, content_type=out_type)
        if close:
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        status = err.code or 500
        return error(status, err.description or status_phrase(status))

    flask_app = app.wsgi_app
    state = serving.state
    invoke = _Invoker(serving)

    def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.monotonic()
        if environ.get("REQUEST_METHOD") == "POST" and environ.get("PATH_INFO") == "/invocations":
            # The hot path, without flask's request/response objects (about 80 us a request saved).
            status, payload, out_type, close = invoke(environ)
            headers = [("Content-Type", out_type), ("Content-Length", str(len(payload)))]
            if close:
                headers.append(("Connection", "close"))
            start_response(_status_line(status), headers)
            state.record_request("invocations", status, time.monotonic() - started)
            return [payload]
        return others(environ, start_response)

    others = count_requests(flask_app, state, lambda path: path.strip("/") or "other")
    app.wsgi_app = counted  # type: ignore[method-assign]
    return app


def count_requests(
    wsgi: Callable[..., Iterable[bytes]], state: SharedState, endpoint_of: Callable[[str], str]
) -> Callable[..., Iterable[bytes]]:
    """``wsgi`` with every response counted in the shared metrics, under
    ``endpoint_of(PATH_INFO)``."""

    def counted(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.monotonic()
        seen: list[int] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen.append(int(status[:3]))
            return (
                start_response(status, headers, exc_info)
                if exc_info
                else start_response(status, headers)
            )

        result = wsgi(environ, capture)
        state.record_request(
            endpoint_of(environ.get("PATH_INFO", "")),
            seen[0] if seen else 500,
            time.monotonic() - started,
        )
        return result

    return counted


class _Invoker:
    """``POST /invocations`` on a bare WSGI environ: (status, body, Content-Type, close the
    connection)."""

    def __init__(self, serving: Serving) -> None:
        self._serving = serving
        self._config = config = serving.config
        self._log = serving.log
        self._client_log = RateLimitedLog(serving.log)
        self._limits = Limits(
            config.max_decoded_bytes,
            config.max_image_pixels,
            config.max_json_depth,
            large_bytes=min(8 * 1024 * 1024, config.max_payload_bytes),
        )
        self._gate = DecodeGate(self._limits)

    def __call__(self, environ: dict[str, Any]) -> tuple[int, bytes, str, bool]:
        large: list[bool] = []
        answer = self._answer(environ, large)
        if answer[0] >= 400 and answer[0] < 500:
            self._client_log.warning(
                "%d %s from %s: %s",
                answer[0],
                environ.get("PATH_INFO", ""),
                environ.get("REMOTE_ADDR", "?"),
                _message(answer[1]),
            )
        if large:  # the request's arrays are gone by now: hand their memory back
            release_memory()
        return answer

    def _answer(self, environ: dict[str, Any], large: list[bool]) -> tuple[int, bytes, str, bool]:
        started = time.monotonic()
        serving, config = self._serving, self._config
        runner = serving.runner
        if runner is None:
            return json_error(503, "this worker is not ready yet; retry")
        limit = config.max_payload_bytes
        length = _content_length(environ)
        if length is not None and length > limit:
            return json_error(
                413,
                f"the body has {length} bytes, over the limit of {limit} "
                f"({limit / 1048576:g} MiB); send less or raise SAGEMAKER_MAX_PAYLOAD_IN_MB",
                close=True,
            )
        content_type = environ.get("CONTENT_TYPE") or codecs.JSON
        handler = serving.handler
        try:
            accept = handler.check_accept(environ.get("HTTP_ACCEPT"))
            if (
                not handler.has_transform
                and not handler.custom_input
                and codecs.media_type(content_type) not in codecs.DECODABLE
            ):
                raise RequestError(
                    415,
                    f"Content-Type {content_type!r} is not supported; send one of "
                    f"{', '.join(codecs.DECODABLE)}",
                )
            with (
                runner.arriving()
            ):  # from the body's first byte until queued: a forming batch waits for it
                if length is None and not environ.get("wsgi.input_terminated"):
                    body = b""  # as werkzeug: no length and a stream the server does not end
                else:
                    body = environ["wsgi.input"].read(limit + 1)
                if len(body) > limit:
                    return json_error(
                        413,
                        f"the body is over the limit of {limit} bytes; send less or raise "
                        "SAGEMAKER_MAX_PAYLOAD_IN_MB",
                        close=True,
                    )
                decoded = check_decoded_size(body, content_type, self._limits)
                with self._gate.admit(len(body), decoded) as is_large:
                    if is_large:
                        large.append(True)
                    if handler.has_transform:
                        future = runner.submit(_Transform(body, content_type, accept))
                    else:
                        data, key = handler.input(body, content_type)
                        if data is None and handler.custom_input:
                            raise RequestError(
                                500,
                                "input_fn returned None; return the decoded input (for "
                                "example a tensor)",
                            )
                        future = runner.submit(data, key)
                        del data
            remaining = config.timeout - (time.monotonic() - started)
            try:
                result = future.result(max(0.0, remaining))
            except TimeoutError:
                future.cancel()
                serving.state.record_timeout()
                self._log.warning(
                    "a request took longer than %g s; answered 504 (the call is abandoned; a "
                    "call still running after %g s replaces the worker)",
                    config.timeout,
                    config.stuck_timeout,
                )
                return json_error(
                    504,
                    f"the model did not answer within {config.timeout:g} s; raise "
                    "SAGEMAKER_MODEL_SERVER_TIMEOUT or send less per request",
                )
            payload, out_type = result if handler.has_transform else handler.output(result, accept)
        except RequestError as err:
            if err.status >= 500:
                self._log.error(
                    "invocation failed (%d): %s",
                    err.status,
                    err.message,
                    exc_info=err.__cause__ or err,
                )
            return json_error(err.status, err.message)
        except MemoryError:
            self._log.error(
                "a request ran out of memory while decoding or predicting; answered 413"
            )
            return json_error(
                413,
                "the request needs more memory than this worker has; send less per request "
                "(or lower TORCHBAY_SERVE_MAX_DECODED_MB so such requests are refused up front)",
            )
        except RecursionError:
            return json_error(400, "the body nests too deeply to decode; send a flat array of rows")
        except (
            SystemExit,
            KeyboardInterrupt,
        ) as err:  # model code called sys.exit(): the request fails, not the worker
            self._log.error(
                "model code raised %s(%r) during a request; answered 500, the worker lives on",
                type(err).__name__,
                getattr(err, "code", None),
            )
            return json_error(
                500,
                f"the model code called sys.exit({getattr(err, 'code', '')}) during the request; "
                "raise an exception instead",
            )
        except (
            Exception
        ) as err:  # top of a request: a bug or an unexpected failure; logged, never fatal
            self._log.exception("invocation failed")
            return json_error(
                500,
                f"the model failed: {_exception_name(err)}: {_last_line(err)}; see the server log",
            )
        return 200, payload, out_type, False


def _exception_name(err: BaseException) -> str:
    kind = type(err)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _last_line(err: BaseException) -> str:
    """The last line of a message: where TorchScript's interpreter errors put the cause."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else "(no message)")[:300]


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))[:300]
    except (ValueError, AttributeError):
        return ""


def _content_length(environ: dict[str, Any]) -> int | None:
    value = environ.get("CONTENT_LENGTH")
    if not value:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def json_error(status: int, message: str, *, close: bool = False) -> tuple[int, bytes, str, bool]:
    body = json.dumps({"code": status, "error": status_phrase(status), "message": message}).encode()
    return status, body, codecs.JSON, close


def _status_line(status: int) -> str:
    return f"{status} {status_phrase(status).upper()}"  # as werkzeug writes it


def _registry(state: SharedState) -> Any:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(state.collector())
    return registry


def status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"
