"""The Ray Serve application: `serve run conf/serve.yaml`.

One deployment, `Emotion`, whose replicas each do the whole request: HTTP (auth, upload limits),
decoding, finding faces, the forward pass and JSON (or the annotated photo), and the page at `/`.
Every hop between deployments costs more CPU than a 48x48 forward pass, so the model lives in the
replica that parses the request rather than behind a second deployment.

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

`/explain` answers as `/predict` does, through the same batched forward pass, and then computes
Grad-CAM heatmaps (`emotion.explain`) in a worker thread of its own, never in the batcher: a
backward pass costs several forward passes, and plain predictions must not queue behind it.
"""

import asyncio
import base64
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

import emotion
from emotion.checkpoint import load_checkpoint
from emotion.explain import Explainer, overlay, png_bytes
from emotion.faces import FACE_MODES, Face, FaceConfig, FaceCrop, FaceFinder, FacesInImage, load_face_config
from emotion.predictor import BACKENDS, PRECISIONS, Predictor, pick_device, prediction_record
from emotion.preprocess import decode_upright
from serve.annotate import LabelledFace, annotated_png
from serve.batching import Batcher
from serve.limits import UploadLimit

SERVICE = "emotion-ray"
MODEL_HEADER = "x-emotion-model"
MULTIPLEXED_MODEL_HEADER = "serve_multiplexed_model_id"
# Forward passes see only pixels already decoded to the model's shape, so a failure is not the
# client's doing. One can be a bad moment; this many in a row with no success between means the
# replica cannot score, and its health check fails so that Serve replaces it.
FAILED_BATCHES_BEFORE_UNHEALTHY = 3
# The project's face detector and framing, used when `face_config` is null. Resolved in the
# replica, against the code it runs, so a cluster's replicas read the file shipped beside them.
DEFAULT_FACE_CONFIG = Path(__file__).resolve().parents[1] / "conf" / "faces.yaml"
PAGE = Path(__file__).resolve().parent / "page.html"
# Pixels on a side of an explanation's overlay: the model's crop enlarged enough to see.
OVERLAY_SIDE = 192
# The page makes no request outside this service: its script and style are inline, the photo it
# shows is a blob: URL made from /annotate's answer.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "img-src blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


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
    backend: str
    threads_per_actor: int | None
    models_per_replica: int
    faces: str
    face_config: str | None


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
    Faces are cut at this model's input size and channels, so the finder belongs to the model.
    So does its Explainer, built on the first /explain for this model (a second, float32 copy of
    the network that plain predictions never need) and evicted with it.
    """

    def __init__(self, name: str, predictor: Predictor, face_config: FaceConfig, max_pixels: int,
                 registry: dict[str, "_Resident"]) -> None:
        self.name, self.predictor, self.registry = name, predictor, registry
        self.face_config, self.max_pixels = face_config, max_pixels
        self._local = threading.local()
        self._explainer: Explainer | None = None
        # Captum hooks the Explainer's network while it runs, so two explanations at once on one
        # model would read each other's activations: they take turns.
        self._explaining = threading.Lock()
        registry[name] = self

    def find(self, data: bytes, mode: str) -> FacesInImage:
        """The faces in `data`, called in worker threads: each thread keeps its own `FaceFinder`,
        since a detector is only promised to be safe when called from one thread."""
        finder = getattr(self._local, "finder", None)
        if finder is None:
            checkpoint = self.predictor.checkpoint
            finder = self._local.finder = FaceFinder(self.face_config, checkpoint.input_size, checkpoint.channels,
                                                     self.max_pixels)
        return finder.find(data, mode)

    def explain(self, crops: list[FaceCrop], classes: list[int], side: int = OVERLAY_SIDE) -> list[bytes]:
        """PNG overlays of each face's Grad-CAM heatmap for `classes[i]` on its crop, called in a
        worker thread."""
        with self._explaining:
            if self._explainer is None:
                self._explainer = Explainer(self.predictor.checkpoint)
            explained = self._explainer.explain(np.stack([crop.pixels for crop in crops]), classes)
        return [png_bytes(overlay(crop.pixels, e.heatmap, side)) for crop, e in zip(crops, explained, strict=True)]

    def __del__(self) -> None:
        if self.registry.get(self.name) is self:
            del self.registry[self.name]


_PREDICT_BODY = {"content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}, "required": True}
_PNG_RESPONSE = {200: {"content": {"image/png": {}}, "description": "the photo with faces boxed and labelled"}}
_EXPLAIN_RESPONSE = {200: {"content": {
    "application/json": {},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
}, "description": "the /predict answer, each face with `explanation`; or, with Accept: image/png, the "
                  "largest face's overlay"}}
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
        # ONNX Runtime and int8 run on the CPU (build_app refuses any other device for them), so the replica
        # reports what it really runs on rather than what a GPU would pick.
        device = "cpu" if settings.backend == "onnxruntime" or settings.precision == "int8" else settings.device
        self.device = pick_device(device)
        self.loaded: dict[str, _Resident] = {}
        face_config = load_face_config(settings.face_config or DEFAULT_FACE_CONFIG)

        async def load(name: str) -> _Resident:
            predictor = await asyncio.to_thread(
                Predictor, settings.models[name], device=device, max_pixels=settings.max_pixels,
                precision=settings.precision, backend=settings.backend)
            return _Resident(name, predictor, face_config, settings.max_pixels, self.loaded)

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
        self.page = await asyncio.to_thread(PAGE.read_text)
        api.add_api_route("/", self.root, methods=["GET"], response_model=None,
                          responses={200: {"content": {"text/html": {}, "application/json": {}}}})
        api.add_api_route("/info", self.info, methods=["GET"])
        api.add_api_route("/health", self.health, methods=["GET"])
        api.add_api_route("/models", self.models, methods=["GET"])
        api.add_api_route("/stats", self.stats, methods=["GET"])
        api.add_api_route("/predict", self.predict, methods=["POST"], openapi_extra={"requestBody": _PREDICT_BODY})
        api.add_api_route("/predict/batch", self.predict_batch, methods=["POST"],
                          openapi_extra={"requestBody": _PREDICT_BATCH_BODY})
        api.add_api_route("/annotate", self.annotate, methods=["POST"], response_class=Response,
                          responses=_PNG_RESPONSE, openapi_extra={"requestBody": _PREDICT_BODY})
        api.add_api_route("/explain", self.explain, methods=["POST"], response_class=Response,
                          responses=_EXPLAIN_RESPONSE, openapi_extra={"requestBody": _PREDICT_BODY})
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

    def _face_mode(self, query: str | None) -> str:
        """`?faces=` when given, else the configured default; an unknown mode is refused by name."""
        mode = query or self.settings.faces
        if mode not in FACE_MODES:
            raise HTTPException(422, f"unknown faces mode {mode!r}; known: {', '.join(FACE_MODES)}")
        return mode

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

    async def _classify(self, resident: _Resident, data: bytes, mode: str) -> tuple[list[FaceCrop], dict[str, Any]]:
        """One image's faces, largest first, and its answer: every face scored, and the largest
        face's prediction at the top level (what clients read before faces existed). Decoding and
        detection run in a worker thread; all of the image's faces share one forward pass."""
        found = await asyncio.to_thread(resident.find, data, mode)
        if found.error is not None:
            error = found.error
            if error.startswith(_TOO_MANY_PIXELS):
                error += f" (at most {self.settings.max_pixels})"
            return [], {"status": "error", "error": error, "code": _decode_status(error)}
        image = {"model": resident.name, "width": found.width, "height": found.height, "detected": found.detected}
        if not found.crops:
            return [], {"status": "no_face", "faces": [], **image}
        probs = await self.batcher.predict(resident.predictor, np.stack([crop.pixels for crop in found.crops]))
        faces = [_face_record(crop.face, row, resident.predictor.labels)
                 for crop, row in zip(found.crops, probs, strict=True)]
        largest = {key: value for key, value in faces[0].items() if key not in ("box", "score")}
        return found.crops, {"status": "ok", **largest, "faces": faces, **image}

    async def root(self, request: Request) -> Response:
        """The page people use (`serve/page.html`); the service's description for a client that
        asks for JSON, as `GET /` answered before the page existed."""
        accept = request.headers.get("accept", "")
        if "application/json" in accept and "text/html" not in accept:
            return JSONResponse(await self.info())
        return HTMLResponse(self.page, headers={"Content-Security-Policy": PAGE_POLICY})

    async def info(self) -> dict[str, Any]:
        """Service name and version."""
        return {"service": SERVICE, "version": emotion.__version__, "docs": "/docs"}

    async def health(self) -> dict[str, Any]:
        """For load balancers' probes: reports, and never loads or evicts a model."""
        # Precision is per model: "auto" times each network on this replica's CPU.
        precisions = {name: resident.predictor.precision for name, resident in sorted(self.loaded.items())}
        return {"status": "ok", "device": str(self.device), "precision": precisions,
                "backend": self.settings.backend, "models": sorted(self.settings.models),
                "loaded_models": sorted(self.loaded)}

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
        return {"default": self.settings.default_model, "backend": self.settings.backend, "models": listed}

    async def stats(self, request: Request) -> dict[str, Any]:
        """This replica's recent batch sizes: evidence that concurrent requests share passes.

        Behind the token like /models: it tells a caller which models are loaded and how busy
        the replica is. /health stays open for load balancers' probes.
        """
        self._authorize(request)
        return {"loaded_models": sorted(self.loaded), "recent_batch_sizes": list(self.batcher.batch_sizes)[-200:]}

    async def _one_request(self, request: Request, model: str | None, faces: str | None
                           ) -> tuple[_Resident, bytes, str]:
        """The checks /predict, /annotate and /explain share, in order: token, model, faces mode,
        the image's bytes; then the model, loaded if this replica does not hold it."""
        self._authorize(request)
        name = self._model_name(request, model)
        mode = self._face_mode(faces)
        images = await self._images(request, many=False)
        return await self.get_model(name), images[0][1], mode

    async def _answer(self, resident: _Resident, data: bytes, mode: str) -> tuple[list[FaceCrop], dict[str, Any]]:
        """One image's faces and answer; an image that cannot be read is an HTTP error with the reason."""
        crops, result = await self._classify(resident, data, mode)
        if result["status"] == "error":
            raise HTTPException(result["code"], result["error"])
        return crops, result

    async def predict(
        self, request: Request,
        model: str | None = Query(None, description=f"model name (or header {MODEL_HEADER})"),
        faces: str | None = Query(None, description=f"one of {', '.join(FACE_MODES)}; default from the config"),
    ) -> JSONResponse:
        """One image (multipart field `file` or a raw body): every face found, largest first, and
        the largest face's prediction at the top level (`status: no_face` when none is found)."""
        started = time.perf_counter()
        _, result = await self._answer(*await self._one_request(request, model, faces))
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(result)

    async def annotate(
        self, request: Request,
        model: str | None = Query(None, description=f"model name (or header {MODEL_HEADER})"),
        faces: str | None = Query(None, description=f"one of {', '.join(FACE_MODES)}; default from the config"),
    ) -> Response:
        """The same input as /predict; the upright photo as PNG with each face boxed and labelled."""
        resident, data, mode = await self._one_request(request, model, faces)
        _, result = await self._answer(resident, data, mode)
        labelled = [LabelledFace(_box(face["box"]), face["predicted_class"], face["predicted_label"],
                                 face["confidence"]) for face in result["faces"]]
        png = await asyncio.to_thread(_draw, data, labelled, self.settings.max_pixels)
        return Response(png, media_type="image/png")

    async def explain(
        self, request: Request,
        model: str | None = Query(None, description=f"model name (or header {MODEL_HEADER})"),
        faces: str | None = Query(None, description=f"one of {', '.join(FACE_MODES)}; default from the config"),
        target: str | None = Query(None, description="the label to explain; default: each face's predicted one"),
    ) -> Response:
        """The same input and answer as /predict, each face with the Grad-CAM overlay of the class
        explained on its crop (base64 PNG); with `Accept: image/png`, the largest face's overlay
        alone, or 404 when no face is found."""
        started = time.perf_counter()
        resident, data, mode = await self._one_request(request, model, faces)
        labels = resident.predictor.labels
        if target is not None and target not in labels:
            raise HTTPException(422, f"unknown target {target!r}; known: {', '.join(labels)}")
        crops, result = await self._answer(resident, data, mode)
        png_only = _wants_png(request.headers.get("accept", ""))
        if not crops:
            if png_only:
                raise HTTPException(404, f"no face found to explain (faces={mode})")
            return JSONResponse(result | {"latency_ms": round((time.perf_counter() - started) * 1000, 2)})
        if png_only:
            crops = crops[:1]
        classes = [labels.index(target) if target is not None else face["predicted_class"]
                   for face in result["faces"][: len(crops)]]
        overlays = await asyncio.to_thread(resident.explain, crops, classes)
        if png_only:
            return Response(overlays[0], media_type="image/png")
        for face, cls, png in zip(result["faces"], classes, overlays, strict=True):
            face["explanation"] = {"target_label": labels[cls], "target_class": cls,
                                   "heatmap_png": base64.b64encode(png).decode("ascii")}
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(result)

    async def predict_batch(
        self, request: Request, model: str | None = Query(None),
        faces: str | None = Query(None, description=f"one of {', '.join(FACE_MODES)}; default from the config"),
    ) -> JSONResponse:
        """Several images (multipart fields `files`): one result each, as /predict answers it,
        failures reported per item."""
        started = time.perf_counter()
        self._authorize(request)
        name = self._model_name(request, model)
        mode = self._face_mode(faces)
        images = await self._images(request, many=True)
        resident = await self.get_model(name)
        answers = await asyncio.gather(*(self._classify(resident, data, mode) for _, data in images))
        results = [result for _, result in answers]
        for (filename, _), result in zip(images, results, strict=True):
            result["filename"] = filename
            result.pop("code", None)
        return JSONResponse({"model": name, "results": results,
                             "latency_ms": round((time.perf_counter() - started) * 1000, 2)})


def _face_record(face: Face | None, probs: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """One face in the answer: its box in the upright photo's pixels and the detector's score
    (both null when the whole image was taken as the face), and its prediction record."""
    record = prediction_record(probs, labels)
    return {
        "box": None if face is None else {"x": face.x, "y": face.y, "w": face.w, "h": face.h},
        "score": None if face is None else face.score,
        **record,
        # The name earlier releases answered with; kept for one release beside predicted_label.
        "predicted_emotion": record["predicted_label"],
    }


def _wants_png(accept: str) -> bool:
    """Whether an Accept header asks for image/png rather than JSON (a browser's `*/*` does not)."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    return "image/png" in types and "application/json" not in types


def _box(box: dict[str, int] | None) -> tuple[int, int, int, int] | None:
    return None if box is None else (box["x"], box["y"], box["w"], box["h"])


def _draw(data: bytes, faces: list[LabelledFace], max_pixels: int) -> bytes:
    """The annotated PNG, in a worker thread: the photo is decoded again at full size and in
    colour, which the classifier's crops never needed."""
    decoded = decode_upright(data, 3, max_pixels)
    if decoded.pixels is None:
        raise RuntimeError(f"an image decoded for its faces could not be decoded again: {decoded.error}")
    return annotated_png(decoded.pixels, faces)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder named in conf/serve.yaml; `args` become `Settings`.

    The bearer token may come from the EMOTION_API_TOKEN environment variable, so that it need
    not be written into a config file. Every checkpoint and the face config are read once here,
    so that a wrong path, a bad `faces` or a backend with a precision it cannot run fails the
    deployment rather than a request; nothing read is passed on.
    """
    settings = Settings(**args)
    if not settings.auth_token and os.environ.get("EMOTION_API_TOKEN"):
        settings = Settings(**(args | {"auth_token": os.environ["EMOTION_API_TOKEN"]}))
    if settings.default_model not in settings.models:
        raise ValueError(f"default_model {settings.default_model!r} is not one of models: {sorted(settings.models)}")
    if settings.faces not in FACE_MODES:
        raise ValueError(f"faces {settings.faces!r} is not one of {', '.join(FACE_MODES)}")
    if settings.backend not in BACKENDS:
        raise ValueError(f"backend {settings.backend!r} is not one of {', '.join(BACKENDS)}")
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision {settings.precision!r} is not one of {', '.join(PRECISIONS)}")
    if settings.backend == "onnxruntime" and settings.precision == "bf16":
        raise ValueError("backend onnxruntime runs float32 or int8 on the CPU: precision must be auto, fp32 or int8 "
                         "(not 'bf16')")
    if settings.backend == "onnxruntime" and settings.device not in (None, "cpu"):
        raise ValueError(f"backend onnxruntime runs float32 or int8 on the CPU: device must be null or cpu "
                         f"(not {settings.device!r})")
    if settings.precision == "int8" and settings.device not in (None, "cpu"):
        raise ValueError(f"precision int8 runs on the CPU only: device must be null or cpu (not {settings.device!r})")
    load_face_config(settings.face_config or DEFAULT_FACE_CONFIG)
    for name, path in settings.models.items():
        if not load_checkpoint(path).int8_graph and settings.precision == "int8":
            raise ValueError(f"precision int8: model {name!r} ({path}) carries no int8 graph "
                             "(python -m jobs.quantize makes one)")
    return Emotion.bind(settings)
