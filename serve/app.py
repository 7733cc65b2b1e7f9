"""The Ray Serve application: `serve run conf/serve.yaml`.

One deployment, `Emotion`, whose replicas each do the whole request: HTTP (auth, upload limits),
decoding, the forward pass and JSON. Every hop between deployments costs more CPU than a 48x48
forward pass, so the model lives in the replica that parses the request rather than behind a
second deployment.

Checkpoints are loaded on demand through Serve's model multiplexing (least recently used
evicted), and concurrent requests for one model share forward passes (`serve.batching`). Labels,
input size and decoding all come from the checkpoint the replica loaded, never from a copy read
elsewhere, so replacing a file cannot make them disagree with the weights.

The model id is Serve's multiplexed model id. Serve routes on it only when it reaches the router:
as the `serve_multiplexed_model_id` HTTP header (Serve's proxy then prefers replicas that hold or
are loading that model, which each replica reports as it loads and evicts) or through a handle's
`.options(multiplexed_model_id=...)`. `?model=NAME` and the `X-Emotion-Model` header are read here,
in the replica already chosen: they select the model, which this replica loads if it must, but
cannot steer routing. A thin ingress deployment forwarding them through a handle would let them
steer it too, at the price of the extra hop above; clients that care send the multiplexing header.
Under HAProxy (conf/serve.env) Serve 2.60 balances replicas by least connections and does not
route on the model id at all; with a few models per replica that costs a load, not an error.
"""

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from ray import serve

import emotion
from emotion.checkpoint import load_checkpoint
from emotion.precision import resolve_precision
from emotion.predictor import Predictor, pick_device, prediction_record
from serve.batching import Batcher
from serve.limits import UploadLimit

SERVICE = "emotion-ray"
MODEL_HEADER = "x-emotion-model"
MULTIPLEXED_MODEL_HEADER = "serve_multiplexed_model_id"
# Forward passes see only pixels already decoded to the model's shape, so a failure is not the
# client's doing. One can be a bad moment; this many in a row with no success between means the
# replica cannot score, and its health check fails so that Serve replaces it.
FAILED_BATCHES_BEFORE_UNHEALTHY = 3


@dataclass(frozen=True)
class Settings:
    """The application's `args` in conf/serve.yaml, which holds every default."""

    models: dict[str, str | None]
    default_model: str
    max_upload_bytes: int
    upload_timeout_s: float | None
    min_upload_bytes_per_s: float | None
    max_pixels: int
    max_files_per_request: int
    auth_token: str | None
    cors_origins: list[str]
    device: str | None
    precision: str
    threads_per_actor: int | None
    models_per_replica: int


# Decoding errors that mean "this is not something we can read" versus "it is an image, but broken".
_UNSUPPORTED = {"not an image"}
# An image over the pixel cap is refused like an upload over the byte cap: the request is too large
# for this service, and the client can fix it by downscaling, which 413 says and 400 does not.
_TOO_MANY_PIXELS = "too many pixels"


def _decode_status(error: str) -> int:
    if error == "empty file":
        return 422
    if error.startswith(_TOO_MANY_PIXELS):
        return 413
    return 415 if error in _UNSUPPORTED else 400


class _Resident:
    """A Predictor held by Serve's multiplexer, which calls `__del__` when it evicts the model.

    The registry maps a model name to the holder now serving it, so /health lists what a replica
    really holds; a holder only removes its own entry, never a newer load of the same name.
    """

    def __init__(self, name: str, predictor: Predictor, registry: dict[str, "_Resident"]) -> None:
        self.name, self.predictor, self.registry = name, predictor, registry
        registry[name] = self

    def __del__(self) -> None:
        if self.registry.get(self.name) is self:
            del self.registry[self.name]


_PREDICT_BODY = {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}, "required": True}
_PREDICT_BATCH_BODY = {"content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
}}}, "required": True}


@serve.deployment(name="Emotion")
@serve.ingress()
class Emotion:
    """One replica: HTTP in, decoding, shared forward passes, JSON out.

    The FastAPI app is built per replica (`__serve_build_asgi_app__`) because its upload limits
    and CORS origins come from the application's args; the routes are this class's methods.
    Batching takes `max_batch_size` from `user_config`, so it changes without restarting replicas.
    """

    batcher: Batcher

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Without a setting, torch would start a thread per core in every replica, and replicas
        # sharing a node would oversubscribe its cores (docs/benchmarks.md).
        reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(settings.threads_per_actor or max(int(reserved), 1))
        self.device = pick_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
        self.loaded: dict[str, _Resident] = {}

        async def load(name: str) -> _Resident:
            predictor = await asyncio.to_thread(
                Predictor, settings.models[name], device=settings.device, max_pixels=settings.max_pixels,
                precision=settings.precision)
            return _Resident(name, predictor, self.loaded)

        # Wrapped here rather than decorated on the class because the cache size is a setting;
        # Serve 2.60 detects multiplexing wired up on the instance.
        self.get_model = serve.multiplexed(max_num_models_per_replica=settings.models_per_replica)(load)

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """The replica's HTTP app, loaded with the default model so that it starts ready to serve
        (and fails to start on a broken default checkpoint rather than failing requests)."""
        await self.get_model(self.settings.default_model)
        settings = self.settings
        api = FastAPI(
            title=SERVICE,
            version=emotion.__version__,
            description="Facial emotion recognition. Upload images; get probabilities for "
            + ", ".join(emotion.LABELS) + ".",
        )
        api.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes, timeout_s=settings.upload_timeout_s,
                           min_rate=settings.min_upload_bytes_per_s)
        if settings.cors_origins:
            api.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                               allow_methods=["GET", "POST"], allow_headers=["*"])
        api.add_api_route("/", self.root, methods=["GET"])
        api.add_api_route("/health", self.health, methods=["GET"])
        api.add_api_route("/models", self.models, methods=["GET"])
        api.add_api_route("/stats", self.stats, methods=["GET"])
        api.add_api_route("/predict", self.predict, methods=["POST"], openapi_extra={"requestBody": _PREDICT_BODY})
        api.add_api_route("/predict/batch", self.predict_batch, methods=["POST"],
                          openapi_extra={"requestBody": _PREDICT_BATCH_BODY})
        return api

    def reconfigure(self, config: dict[str, Any]) -> None:
        """`user_config` from conf/serve.yaml: the largest forward pass."""
        if hasattr(self, "batcher"):
            self.batcher.max_batch_size = int(config["max_batch_size"])
        else:
            self.batcher = Batcher(int(config["max_batch_size"]))

    def check_health(self) -> None:
        """Serve restarts a replica whose health check raises: here, one whose recent forward
        passes all failed."""
        failed = self.batcher.failed_in_a_row
        if failed >= FAILED_BATCHES_BEFORE_UNHEALTHY:
            raise RuntimeError(f"the last {failed} forward passes all raised")

    def _authorize(self, request: Request) -> None:
        token = self.settings.auth_token
        if token and request.headers.get("authorization") != f"Bearer {token}":
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _model_name(self, request: Request, query: str | None) -> str:
        """The request's model: the multiplexing header, `?model=` or `X-Emotion-Model` (they must
        agree when several are given), else the default."""
        given = {source: name for source, name in (
            (f"header {MULTIPLEXED_MODEL_HEADER}", serve.get_multiplexed_model_id()),
            ("?model", query),
            (f"header {MODEL_HEADER}", request.headers.get(MODEL_HEADER)),
        ) if name}
        if len(set(given.values())) > 1:
            choices = ", ".join(f"{source} {name!r}" for source, name in given.items())
            raise HTTPException(400, f"conflicting model choices: {choices}")
        name = next(iter(given.values()), self.settings.default_model)
        if name not in self.settings.models:
            raise HTTPException(404, f"unknown model {name!r}; available: {sorted(self.settings.models)}")
        return name

    async def _images(self, request: Request, many: bool) -> list[tuple[str, bytes]]:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_files=self.settings.max_files_per_request)
            uploads = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
            wanted = [u for u in uploads if u[0] in ("file", "files")] if many else \
                [u for u in uploads if u[0] == "file"][:1]
            if not wanted:
                field_name = "files" if many else "file"
                raise HTTPException(422, f"no image: send multipart field '{field_name}'")
            return [(u.filename or f"file{i}", await u.read()) for i, (_, u) in enumerate(wanted)]
        if many:
            raise HTTPException(422, "no images: send multipart fields 'files'")
        body = await request.body()
        if not body:
            raise HTTPException(422, "no image: send multipart field 'file' or a raw image body")
        return [("body", body)]

    async def _classify(self, name: str, predictor: Predictor, data: bytes) -> dict[str, Any]:
        decoded = await asyncio.to_thread(predictor.decode, data)
        if decoded.error is not None:
            error = decoded.error
            if error.startswith(_TOO_MANY_PIXELS):
                error += f" (at most {self.settings.max_pixels})"
            return {"status": "error", "error": error, "code": _decode_status(error)}
        record = prediction_record(await self.batcher.predict(predictor, decoded.pixels), predictor.labels)
        return {
            "status": "ok",
            **record,
            # The name earlier releases answered with; kept for one release beside predicted_label.
            "predicted_emotion": record["predicted_label"],
            "model": name,
            "width": decoded.width,
            "height": decoded.height,
        }

    async def root(self) -> dict[str, Any]:
        """Service name and version."""
        return {"service": SERVICE, "version": emotion.__version__, "docs": "/docs"}

    async def health(self) -> dict[str, Any]:
        """For load balancers' probes: reports, and never loads or evicts a model."""
        return {"status": "ok", "device": str(self.device), "precision": self.precision,
                "models": sorted(self.settings.models), "loaded_models": sorted(self.loaded)}

    async def models(self, request: Request) -> dict[str, Any]:
        """Each configured checkpoint's description: from the loaded model where this replica holds
        it, else read from its file (without loading it into the multiplexer)."""
        self._authorize(request)
        keys = ("arch", "labels", "input_size", "channels", "metrics", "trained_on", "num_params", "created")
        listed = []
        for name, path in self.settings.models.items():
            resident = self.loaded.get(name)
            checkpoint = resident.predictor.checkpoint if resident else await asyncio.to_thread(load_checkpoint, path)
            card = checkpoint.describe()
            listed.append({"name": name, **{k: card[k] for k in keys}})
        return {"default": self.settings.default_model, "models": listed}

    async def stats(self, request: Request) -> dict[str, Any]:
        """This replica's recent batch sizes: evidence that concurrent requests share passes.

        Behind the token like /models: it tells a caller which models are loaded and how busy
        the replica is. /health stays open for load balancers' probes.
        """
        self._authorize(request)
        return {"loaded_models": sorted(self.loaded), "recent_batch_sizes": list(self.batcher.batch_sizes)[-200:]}

    async def predict(
        self, request: Request,
        model: str | None = Query(None, description=f"model name (or header {MODEL_HEADER})"),
    ) -> JSONResponse:
        """One image (multipart field `file` or a raw body): its prediction."""
        started = time.perf_counter()
        self._authorize(request)
        name = self._model_name(request, model)
        images = await self._images(request, many=False)
        resident = await self.get_model(name)
        result = await self._classify(name, resident.predictor, images[0][1])
        if result["status"] == "error":
            raise HTTPException(result["code"], result["error"])
        del result["status"]
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(result)

    async def predict_batch(self, request: Request, model: str | None = Query(None)) -> JSONResponse:
        """Several images (multipart fields `files`): one result each, failures reported per item."""
        started = time.perf_counter()
        self._authorize(request)
        name = self._model_name(request, model)
        images = await self._images(request, many=True)
        resident = await self.get_model(name)
        results = await asyncio.gather(*(self._classify(name, resident.predictor, data) for _, data in images))
        for (filename, _), result in zip(images, results, strict=True):
            result["filename"] = filename
            result.pop("code", None)
        return JSONResponse({"model": name, "results": results,
                             "latency_ms": round((time.perf_counter() - started) * 1000, 2)})


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named in conf/serve.yaml; `args` become `Settings`.

    The bearer token may come from the EMOTION_API_TOKEN environment variable, so that it need
    not be written into a config file. Every checkpoint is read once here, so that a wrong path
    fails the deployment rather than a request; nothing read is passed on.
    """
    settings = Settings(**args)
    if not settings.auth_token and os.environ.get("EMOTION_API_TOKEN"):
        settings = Settings(**(args | {"auth_token": os.environ["EMOTION_API_TOKEN"]}))
    if settings.default_model not in settings.models:
        raise ValueError(f"default_model {settings.default_model!r} is not one of models: {sorted(settings.models)}")
    for path in settings.models.values():
        load_checkpoint(path)
    return Emotion.bind(settings)
