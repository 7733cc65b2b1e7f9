"""The Ray Serve application: `serve run conf/serve.yaml`.

One deployment, `Emotion`, whose replicas each do the whole request: HTTP (auth, upload limits),
decoding, the forward pass and JSON. Checkpoints are loaded on demand through Serve's model
multiplexing (least recently used evicted), and concurrent requests share forward passes through
`@serve.batch`. Every hop between deployments costs more CPU than a 48x48 forward pass, so the
model lives in the replica that parses the request rather than behind a second deployment.
"""

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from ray import serve

import emotion
from emotion.checkpoint import load_checkpoint
from emotion.predictor import Predictor
from emotion.preprocess import decode_image
from serve.limits import UploadLimit

SERVICE = "emotion-ray"
MODEL_HEADER = "x-emotion-model"


@dataclass(frozen=True)
class Settings:
    """The application's `args` in conf/serve.yaml."""

    models: dict[str, str | None] = field(default_factory=lambda: {"emotion_cnn_fer2013": None})
    default_model: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    upload_timeout_s: float | None = 20.0
    min_upload_bytes_per_s: float | None = 8192.0
    max_pixels: int = 4096 * 4096
    max_files_per_request: int = 64
    auth_token: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    device: str | None = None
    precision: str = "auto"
    torch_threads: int | None = None
    models_per_replica: int = 4

    @property
    def default(self) -> str:
        return self.default_model or next(iter(self.models))


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

    The registry maps a model name to the id of the holder now serving it, so /health lists what a
    replica really holds; a holder only removes its own entry, never a newer load of the same name.
    """

    def __init__(self, name: str, predictor: Predictor, registry: dict[str, int]) -> None:
        self.name, self.predictor, self.registry = name, predictor, registry
        registry[name] = id(self)

    def __del__(self) -> None:
        if self.registry.get(self.name) == id(self):
            del self.registry[self.name]


def _build_api(settings: Settings) -> FastAPI:
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
    return api


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named in conf/serve.yaml; `args` become `Settings`.

    The bearer token may come from the EMOTION_API_TOKEN environment variable, so that it need
    not be written into a config file.
    """
    settings = Settings(**args)
    if not settings.auth_token and os.environ.get("EMOTION_API_TOKEN"):
        settings = Settings(**(args | {"auth_token": os.environ["EMOTION_API_TOKEN"]}))
    unknown = [m for m in [settings.default] if m not in settings.models]
    if unknown:
        raise ValueError(f"default_model {unknown[0]!r} is not one of models: {sorted(settings.models)}")
    cards = {name: load_checkpoint(path).describe() for name, path in settings.models.items()}
    api = _build_api(settings)

    @serve.deployment(name="Emotion")
    @serve.ingress(api)
    class Emotion:
        def __init__(self) -> None:
            # Without a setting, torch would start a thread per core in every replica: two replicas
            # of two threads on 2 cores answered 177 requests/s at 32 clients, of one thread 275.
            reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            torch.set_num_threads(settings.torch_threads or max(int(reserved), 1))
            self.cards = cards
            self.specs = {name: (c["input_size"], c["channels"]) for name, c in cards.items()}
            self.loaded: dict[str, int] = {}
            self.batch_sizes: list[int] = []

        @serve.multiplexed(max_num_models_per_replica=settings.models_per_replica)
        async def get_model(self, name: str) -> _Resident:
            predictor = await asyncio.to_thread(
                Predictor, settings.models[name], device=settings.device, precision=settings.precision)
            return _Resident(name, predictor, self.loaded)

        def reconfigure(self, config: dict[str, Any]) -> None:
            """Batching knobs from `user_config`, changeable without restarting replicas."""
            self.forward.set_max_batch_size(int(config.get("max_batch_size", 32)))
            self.forward.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
        async def forward(self, requests: list[tuple[str, np.ndarray]]) -> list[list[float]]:
            """One forward pass per model among the queued requests."""
            self.batch_sizes.append(len(requests))
            del self.batch_sizes[:-1000]
            results: list[list[float]] = [[] for _ in requests]
            for name in dict.fromkeys(model for model, _ in requests):
                rows = [i for i, (model, _) in enumerate(requests) if model == name]
                predictor = (await self.get_model(name)).predictor
                probs = await asyncio.to_thread(
                    predictor.predict_pixels, np.stack([requests[i][1] for i in rows]))
                for i, row in zip(rows, probs.tolist(), strict=True):
                    results[i] = row
            return results

        def check_health(self) -> None:
            """Serve restarts a replica whose health check raises; none may hold a broken model."""
            if settings.default not in settings.models:
                raise RuntimeError(f"default model {settings.default!r} is not configured")

        def _authorize(self, request: Request) -> None:
            if settings.auth_token and request.headers.get("authorization") != f"Bearer {settings.auth_token}":
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

        def _model(self, request: Request, model: str | None) -> str:
            name = model or request.headers.get(MODEL_HEADER) or settings.default
            if name not in self.cards:
                raise HTTPException(404, f"unknown model {name!r}; available: {sorted(self.cards)}")
            return name

        async def _images(self, request: Request, many: bool) -> list[tuple[str, bytes]]:
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                form = await request.form(max_files=settings.max_files_per_request)
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

        async def _classify(self, model: str, data: bytes) -> dict[str, Any]:
            size, channels = self.specs[model]
            decoded = await asyncio.to_thread(decode_image, data, size, channels, settings.max_pixels)
            if decoded.error is not None:
                error = decoded.error
                if error.startswith(_TOO_MANY_PIXELS):
                    error += f" (at most {settings.max_pixels})"
                return {"status": "error", "error": error, "code": _decode_status(error)}
            probs = await self.forward((model, decoded.pixels))
            labels = self.cards[model]["labels"]
            top = int(np.argmax(probs))
            return {
                "status": "ok",
                "predicted_emotion": labels[top],
                "predicted_class": top,
                "confidence": probs[top],
                "probabilities": dict(zip(labels, probs, strict=True)),
                "model": model,
                "width": decoded.width,
                "height": decoded.height,
            }

        @api.get("/")
        async def root(self) -> dict[str, Any]:
            return {"service": SERVICE, "version": emotion.__version__, "docs": "/docs"}

        @api.get("/health")
        async def health(self) -> dict[str, Any]:
            predictor = (await self.get_model(settings.default)).predictor
            return {"status": "ok", "device": str(predictor.device), "precision": predictor.precision,
                    "models": sorted(self.cards), "loaded_models": sorted(self.loaded)}

        @api.get("/models")
        async def models(self, request: Request) -> dict[str, Any]:
            self._authorize(request)
            keys = ("arch", "labels", "input_size", "channels", "metrics", "trained_on", "num_params", "created")
            return {"default": settings.default,
                    "models": [{"name": name, **{k: card[k] for k in keys}} for name, card in self.cards.items()]}

        @api.get("/stats")
        async def stats(self, request: Request) -> dict[str, Any]:
            """This replica's recent batch sizes: evidence that concurrent requests share passes.

            Behind the token like /models: it tells a caller which models are loaded and how busy
            the replica is. /health stays open for load balancers' probes.
            """
            self._authorize(request)
            return {"loaded_models": sorted(self.loaded), "recent_batch_sizes": self.batch_sizes[-200:]}

        @api.post(
            "/predict",
            openapi_extra={"requestBody": {"content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                                   "properties": {"file": {"type": "string", "format": "binary"}}}},
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            }, "required": True}},
        )
        async def predict(
            self, request: Request,
            model: str | None = Query(None, description=f"model name (or header {MODEL_HEADER})"),
        ) -> JSONResponse:
            started = time.perf_counter()
            self._authorize(request)
            name = self._model(request, model)
            images = await self._images(request, many=False)
            result = await self._classify(name, images[0][1])
            if result["status"] == "error":
                raise HTTPException(result["code"], result["error"])
            del result["status"]
            result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
            return JSONResponse(result)

        @api.post(
            "/predict/batch",
            openapi_extra={"requestBody": {"content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
            }}}, "required": True}},
        )
        async def predict_batch(self, request: Request, model: str | None = Query(None)) -> JSONResponse:
            started = time.perf_counter()
            self._authorize(request)
            name = self._model(request, model)
            images = await self._images(request, many=True)
            results = await asyncio.gather(*(self._classify(name, data) for _, data in images))
            for (filename, _), result in zip(images, results, strict=True):
                result["filename"] = filename
                result.pop("code", None)
            return JSONResponse({"model": name, "results": results,
                                 "latency_ms": round((time.perf_counter() - started) * 1000, 2)})

    return Emotion.bind()
