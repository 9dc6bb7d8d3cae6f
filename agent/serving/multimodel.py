"""Multi-model mode: SageMaker's multi-model container contract on one worker process.

    POST   /models                 {"model_name": N, "url": U}: load (409 loaded, 507 no room)
    GET    /models                 {"models": [{"modelName", "modelUrl"}], "nextPageToken"}
    (?next_page_token=&limit=)
    GET    /models/N               the model's description
    DELETE /models/N               unload, after its in-flight requests are done
    POST   /models/N/invoke        predict with model N
    POST   /invocations            predict with the model in X-Amzn-SageMaker-Target-Model

Each model is loaded with the same handler as single-model serving (its own ``code/inference.py``
hooks,
``code/requirements.txt``, batching runner and metrics). One gunicorn worker process holds every
model,
so a load or an unload is seen by every request at once and the memory budget counts each model
once;
requests run on its HTTP threads (a load occupies one thread, never the others). Outside SageMaker a
model named in a request but not loaded is fetched from TORCHBAY_MME_MODEL_PREFIX and loaded on
first
use, unloading the least recently used idle models when the budget needs room.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from werkzeug.exceptions import HTTPException

from agent.errors import ObjectMissing, RequestError, StorageError, TorchBayError
from agent.serving import codecs
from agent.serving.app import Serving, _Invoker, count_requests, json_error, status_phrase
from agent.serving.config import ServeConfig
from agent.serving.fetch import fetch_model, install_requirements
from agent.serving.model import ModelHandler
from agent.serving.registry import READY, LoadedModel, ModelRegistry
from agent.serving.server import run_server
from agent.serving.shared import (
    BATCH_BUCKETS,
    CODES,
    DURATION_BUCKETS,
    ENDPOINTS,
    SharedState,
    _cumulative,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["TARGET_HEADER", "MultiModelServing", "create_multimodel_app", "memory_budget"]

TARGET_HEADER = "X-Amzn-SageMaker-Target-Model"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,254}$")
_PAGE = 100


def memory_budget(megabytes: int | None) -> int:
    """Bytes the models may take: the setting, else 80% of the container's memory (cgroup limit or
    RAM)."""
    if megabytes:
        return int(megabytes) * 1024 * 1024
    total = int(psutil.virtual_memory().total)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total * 0.8)


def _available() -> int | None:
    try:
        return int(psutil.virtual_memory().available)
    except Exception:  # /proc unreadable: the budget alone decides
        return None


def _check_name(name: Any, what: str = "model_name") -> str:
    if (
        not isinstance(name, str)
        or not _NAME.match(name)
        or any(p in ("", ".", "..") for p in name.split("/"))
    ):
        raise RequestError(
            400,
            f"{what} {str(name)[:80]!r} is not a model name; use letters, digits, '.', '_', "
            "'-' (and '/' between parts of a target model)",
        )
    return name


def _folder_name(name: str) -> str:
    return name.replace("/", "__")


class MultiModelServing:
    """What the worker serves with in multi-model mode (``run_server`` drives it like a single-model
    Serving)."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        budget: int,
        model_prefix: str | None,
        env: Mapping[str, str],
        endpoint_url: str | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.config = config
        self.state = SharedState()
        self.registry = ModelRegistry(budget)
        self.model_prefix = model_prefix.rstrip("/") + "/" if model_prefix else None
        self.models_dir = config.layout.root / "models"
        self.env = dict(env)
        self.endpoint_url = endpoint_url
        self.log = log or logging.getLogger("torchbay.serve")
        self.started = False

    # --- worker life ---------------------------------------------------------------------------
    def start_worker(self) -> None:
        self.started = True

    @property
    def busy_since(self) -> float | None:
        """When the oldest model call running now began (monotonic), else None (the stuck-worker
        watch reads it)."""
        times = [
            entry.serving.busy_since
            for entry in self.registry.models()
            if entry.serving is not None and entry.serving.busy_since is not None
        ]
        return min(times) if times else None

    def stop_worker(self) -> None:
        for entry in self.registry.models():
            if entry.serving is not None:
                entry.serving.stop_worker()

    # --- loading -------------------------------------------------------------------------------
    def load(self, name: str, url: str | None, *, evict: bool) -> LoadedModel:
        """Fetch (when remote) and load model ``name``; raises RequestError
        400/403/404/409/500/507."""
        started = time.monotonic()
        entry = self.registry.reserve(name, url or "")
        try:
            path, shown_url = self._materialize(name, url)
            entry.url = shown_url
            victims = self.registry.make_room(
                entry, _dir_bytes(path), evict=evict, available=_available()
            )
            for victim in victims:
                self.log.info(
                    "unloading model %r (least recently used) to make room for %r",
                    victim.name,
                    name,
                )
                self._unload(victim, reason="evicted")
            code_dir = path / "code"
            install_requirements(
                code_dir,
                env=self.env,
                stamp_dir=self.models_dir / ".torchbay" / _folder_name(name),
                log=self.log,
            )
            handler = ModelHandler(
                path,
                code_dir,
                self.config.program,
                default_accept=self.config.default_accept,
                batch_size=self.config.batch_size,
                log=self.log,
            )
            handler.load()
            handler.warm_up()
            serving = Serving(self.config, handler, SharedState(), self.log)
            serving.start_worker()
            self.registry.loaded(
                entry,
                path=path,
                serving=serving,
                invoke=_Invoker(serving),
                charge=_model_bytes(handler.model),
            )
        except RequestError:
            self.registry.failed(entry)
            raise
        except TorchBayError as err:
            self.registry.failed(entry)
            status = 404 if isinstance(err, ObjectMissing) else 500
            raise RequestError(status, f"loading model {name!r} failed: {err.message}") from err
        except (
            BaseException
        ):  # anything else (a bug, an OSError): the name is free again, the error goes on
            self.registry.failed(entry)
            raise
        self.log.info(
            "loaded model %r from %s in %.2f s (%d bytes charged, %d of %d used)",
            name,
            entry.url,
            time.monotonic() - started,
            entry.charge,
            self.registry.used(),
            self.registry.budget,
        )
        return entry

    def _materialize(self, name: str, url: str | None) -> tuple[Path, str]:
        """The local folder holding model ``name``, fetching an archive first when ``url`` is
        remote."""
        if url is None:  # load on first use, from the prefix
            if self.model_prefix is None:
                raise RequestError(
                    404,
                    f"model {name!r} is not loaded; load it with POST /models or set "
                    "TORCHBAY_MME_MODEL_PREFIX to load models on first use",
                )
            candidates = (
                [name] if name.endswith(".tar.gz") else [f"{name}/model.tar.gz", f"{name}.tar.gz"]
            )
            uris = [self.model_prefix + c for c in candidates]
        elif url.startswith("s3://") or (
            url.startswith("file://") and url.endswith((".tar.gz", ".tgz"))
        ):
            if self.model_prefix is None or not url.startswith(self.model_prefix):
                raise RequestError(
                    403,
                    f"url {url!r} is outside TORCHBAY_MME_MODEL_PREFIX "
                    f"({self.model_prefix or 'unset'}); remote models load only from there",
                )
            uris = [url if url.endswith((".tar.gz", ".tgz")) else url.rstrip("/") + "/model.tar.gz"]
        else:
            local = Path(urllib.parse.unquote(url[7:]) if url.startswith("file://") else url)
            try:
                resolved = local.resolve(strict=True)
            except (OSError, RuntimeError):
                raise RequestError(
                    404, f"url {url!r} does not exist; give the folder the model was unpacked into"
                ) from None
            root = self.models_dir.resolve()
            if root not in resolved.parents and resolved != root:
                raise RequestError(
                    403, f"url {url!r} is outside {root}; local models load only from there"
                )
            if not resolved.is_dir():
                raise RequestError(
                    400, f"url {url!r} is not a folder; give the folder the model was unpacked into"
                )
            return resolved, str(url)
        dest = self.models_dir / _folder_name(name)
        last: TorchBayError | None = None
        for uri in uris:
            try:
                fetch_model(uri, dest, endpoint_url=self.endpoint_url, log=self.log)
                return dest, uri
            except StorageError as err:
                last = err
                if not isinstance(err, ObjectMissing):
                    break
        assert last is not None
        status = 404 if isinstance(last, ObjectMissing) else 502
        raise RequestError(
            status, f"model {name!r}: {' nor '.join(uris)} could be fetched: {last.message}"
        )

    # --- unloading -----------------------------------------------------------------------------
    def unload(self, name: str) -> int:
        """Unload ``name`` once its in-flight requests are done; how many it waited for."""
        entry = self.registry.begin_unload(name)
        waited = entry.inflight
        self._unload(entry, reason="request")
        return waited

    def _unload(self, entry: LoadedModel, *, reason: str) -> None:
        left = self.registry.finish_unload(entry, self.config.timeout + 5, reason=reason)
        if left:
            self.log.warning(
                "model %r unloaded with %d requests still running after %g s",
                entry.name,
                left,
                self.config.timeout + 5,
            )
        if entry.serving is not None:
            entry.serving.stop_worker()
        self.log.info("unloaded model %r (%s)", entry.name, reason)

    # --- requests ------------------------------------------------------------------------------
    def invoke(self, name: str, environ: dict[str, Any]) -> tuple[int, bytes, str, bool]:
        """One prediction with model ``name`` (loading it first when on-first-use loading is on)."""
        started = time.monotonic()
        entry = self.registry.acquire(name, wait=self.config.timeout)
        if entry is None and self.model_prefix is not None:
            try:
                self.load(name, None, evict=True)
            except RequestError as err:
                if (
                    err.status != 409
                ):  # 409: another request is loading it; wait for that load below
                    return json_error(err.status, err.message)
            entry = self.registry.acquire(name, wait=self.config.timeout)
        if entry is None:
            return json_error(
                404,
                f"model {name!r} is not loaded; load it with POST /models (GET /models lists the "
                "loaded ones)",
            )
        try:
            result: tuple[int, bytes, str, bool] = entry.invoke(environ)
        finally:
            self.registry.release(entry)
        entry.serving.state.record_request("invocations", result[0], time.monotonic() - started)
        return result

    def describe(self, entry: LoadedModel) -> dict[str, Any]:
        return {
            "modelName": entry.name,
            "modelUrl": entry.url,
            "status": entry.state,
            "memoryBytes": entry.charge,
            "inFlight": entry.inflight,
            "loadedAt": entry.loaded_at or None,
            "idleSeconds": round(time.monotonic() - entry.last_used, 3),
        }


def _dir_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _model_bytes(model: Any) -> int:
    """Bytes of a torch model's parameters and buffers (0 when it is not a module)."""
    total = 0
    for attr in ("parameters", "buffers"):
        fn = getattr(model, attr, None)
        if not callable(fn):
            continue
        try:
            total += sum(int(t.numel()) * int(t.element_size()) for t in fn())
        except (RuntimeError, TypeError, AttributeError):
            pass
    return total


def create_multimodel_app(mms: MultiModelServing) -> Callable[..., Iterable[bytes]]:
    """The WSGI application of multi-model mode."""
    app = Flask("torchbay.serve.multimodel")
    config = mms.config

    def reply(result: tuple[int, bytes, str, bool]) -> Response:
        status, payload, content_type, close = result
        response = Response(payload, status=status, content_type=content_type)
        if close:
            response.headers["Connection"] = "close"
        return response

    def ok(doc: Any, status: int = 200) -> Response:
        return Response(json.dumps(doc), status=status, content_type=codecs.JSON)

    def error(status: int, message: str) -> Response:
        return reply(json_error(status, message))

    @app.get("/ping")
    def ping() -> Response:
        if not mms.started:
            return error(503, "the worker is not ready yet")
        healthy, reason = mms.state.health(1, config.crash_window)
        if not healthy:
            return Response(
                json.dumps({"status": "Unhealthy", "reason": reason}),
                status=503,
                content_type=codecs.JSON,
            )
        return Response('{"status": "Healthy"}', status=200, content_type=codecs.JSON)

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return ok(config.execution_parameters())

    @app.get("/metrics")
    def metrics() -> Response:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(mms.state.collector())
        registry.register(_ModelsCollector(mms))
        return Response(generate_latest(registry), status=200, content_type=CONTENT_TYPE_LATEST)

    @app.post("/models")
    def load_model() -> Response:
        try:
            doc = json.loads(request.get_data(cache=False) or b"null")
        except ValueError:
            doc = None
        if (
            not isinstance(doc, dict)
            or "model_name" not in doc
            or not isinstance(doc.get("url"), str)
        ):
            return error(400, 'send a JSON object {"model_name": "...", "url": "..."}')
        try:
            name = _check_name(doc["model_name"])
            mms.load(name, doc["url"], evict=False)
        except RequestError as err:
            return error(err.status, err.message)
        return ok({"status": f"Model {name!r} loaded"})

    @app.get("/models")
    def list_models() -> Response:
        try:
            limit = int(request.args.get("limit") or request.args.get("max_results") or _PAGE)
        except ValueError:
            return error(400, "limit must be a whole number")
        limit = max(1, min(limit, 1000))
        after = ""
        token = request.args.get("next_page_token")
        if token:
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                return error(400, f"next_page_token {token[:40]!r} is not one this server gave")
        ready = [m for m in mms.registry.models() if m.state == READY and m.name > after]
        page = ready[:limit]
        doc: dict[str, Any] = {"models": [{"modelName": m.name, "modelUrl": m.url} for m in page]}
        if len(ready) > limit:
            doc["nextPageToken"] = base64.urlsafe_b64encode(page[-1].name.encode()).decode()
        return ok(doc)

    @app.get("/models/<path:name>")
    def get_model(name: str) -> Response:
        entry = mms.registry.get(name)
        if entry is None:
            return error(404, f"model {name!r} is not loaded")
        return ok([mms.describe(entry)])

    @app.delete("/models/<path:name>")
    def unload_model(name: str) -> Response:
        try:
            waited = mms.unload(name)
        except RequestError as err:
            return error(err.status, err.message)
        return ok({"status": f"Model {name!r} unloaded", "waitedFor": waited})

    @app.post("/models/<path:name>/invoke")
    def invoke_model(name: str) -> Response:
        try:
            _check_name(name, "model name")
        except RequestError as err:
            return error(err.status, err.message)
        return reply(mms.invoke(name, request.environ))

    @app.post("/invocations")
    def invocations() -> Response:
        target = request.headers.get(TARGET_HEADER)
        if not target:
            return error(
                400,
                f"multi-model mode: name the model in the {TARGET_HEADER} header, or POST to "
                "/models/<name>/invoke",
            )
        try:
            _check_name(target, TARGET_HEADER)
        except RequestError as err:
            return error(err.status, err.message)
        return reply(mms.invoke(target, request.environ))

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        return error(err.code or 500, err.description or status_phrase(err.code or 500))

    def endpoint_of(path: str) -> str:
        return (
            "invocations"
            if path == "/invocations" or path.endswith("/invoke")
            else (path.strip("/") or "other")
        )

    app.wsgi_app = count_requests(app.wsgi_app, mms.state, endpoint_of)  # type: ignore[method-assign]
    return app


class _ModelsCollector:
    """Per-model metrics, labelled ``model``: requests, durations, batch sizes, memory; loads and
    unloads."""

    def __init__(self, mms: MultiModelServing) -> None:
        self._mms = mms

    def collect(self) -> Iterator[Metric]:
        registry = self._mms.registry
        requests = CounterMetricFamily(
            "torchbay_serve_model_requests",
            "Predictions answered, by model and status.",
            labels=["model", "code"],
        )
        durations = HistogramMetricFamily(
            "torchbay_serve_model_request_duration_seconds",
            "Time from a prediction's arrival to its response, by model.",
            labels=["model"],
        )
        batches = HistogramMetricFamily(
            "torchbay_serve_model_batch_size",
            "Requests joined into one model call, by model.",
            labels=["model"],
        )
        memory = GaugeMetricFamily(
            "torchbay_serve_model_memory_bytes",
            "Bytes charged to each loaded model.",
            labels=["model"],
        )
        e = ENDPOINTS.index("invocations")
        stride = len(DURATION_BUCKETS) + 1
        for entry in registry.models():
            memory.add_metric([entry.name], entry.charge)
            if entry.serving is None:
                continue
            snap = entry.serving.state.snapshot()
            for c, code in enumerate(CODES):
                value = snap["requests"][e * len(CODES) + c]
                if value:
                    requests.add_metric([entry.name, str(code) if code else "other"], value)
            row = snap["durations"][e * stride : (e + 1) * stride]
            if sum(row[:-1]):
                durations.add_metric([entry.name], _cumulative(DURATION_BUCKETS, row[:-1]), row[-1])
            if sum(snap["batches"][:-1]):
                batches.add_metric(
                    [entry.name],
                    _cumulative(BATCH_BUCKETS, snap["batches"][:-1]),
                    snap["batches"][-1],
                )
        yield from (requests, durations, batches, memory)
        yield GaugeMetricFamily(
            "torchbay_serve_models_loaded",
            "Models ready to serve.",
            value=sum(1 for m in registry.models() if m.state == READY),
        )
        yield GaugeMetricFamily(
            "torchbay_serve_model_memory_budget_bytes",
            "Bytes all models may take together.",
            value=registry.budget,
        )
        loads = CounterMetricFamily(
            "torchbay_serve_model_loads", "Model loads, by outcome.", labels=["outcome"]
        )
        for outcome, value in registry.loads.items():
            loads.add_metric([outcome], value)
        yield loads
        unloads = CounterMetricFamily(
            "torchbay_serve_model_unloads", "Model unloads, by reason.", labels=["reason"]
        )
        for reason, value in registry.unloads.items():
            unloads.add_metric([reason], value)
        yield unloads


def serve_multi_model(
    settings: Any, config: ServeConfig, env: Mapping[str, str], log: logging.Logger
) -> int:
    """Run gunicorn with one worker holding every model; the exit code."""
    explicit_threads = settings.source("serve_http_threads") != "default"
    config = dataclasses.replace(
        config,
        workers=1,
        preload=False,
        torch_threads=settings.serving.serve_torch_threads or config.torch_threads * config.workers,
        http_threads=config.http_threads if explicit_threads else max(16, config.http_threads),
    )
    mms = MultiModelServing(
        config,
        budget=memory_budget(settings.serving.mme_memory_mb),
        model_prefix=settings.serving.mme_model_prefix,
        env=env,
        endpoint_url=settings.general.endpoint_url,
        log=log,
    )
    mms.models_dir.mkdir(parents=True, exist_ok=True)
    if config.model_uri:
        log.warning(
            "multi-model mode ignores TORCHBAY_MODEL_URI/--model-uri (%s); load models with POST "
            "/models "
            "or TORCHBAY_MME_MODEL_PREFIX",
            config.model_uri,
        )
    log.info(
        "multi-model mode: one worker, %d HTTP threads, %d torch threads, budget %d bytes, models "
        "in %s%s",
        config.http_threads,
        config.torch_threads,
        mms.registry.budget,
        mms.models_dir,
        f", loaded on first use from {mms.model_prefix}" if mms.model_prefix else "",
    )

    def worker_boot(gpu: int | None) -> None:
        torch.set_num_threads(config.torch_threads)

    return run_server(mms, create_multimodel_app(mms), worker_boot=worker_boot)  # type: ignore[arg-type]
