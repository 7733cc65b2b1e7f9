"""Ray Serve's request path with no model: the ceiling any Serve application reaches here.

One FastAPI ingress deployment that parses the multipart upload, as `serve.app` does, and answers
without decoding or scoring. bench/serving.py drives it beside the real application, so that the
share of a request's cost that belongs to Serve itself is measured rather than guessed.

    serve run bench.noop_app:app
"""

from fastapi import FastAPI, Request
from ray import serve

api = FastAPI(title="serve no-op")


@serve.deployment(name="NoOp", max_ongoing_requests=64)
@serve.ingress(api)
class NoOp:
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/predict")
    async def predict(self, request: Request) -> dict[str, int]:
        form = await request.form()
        return {"bytes": len(await form["file"].read())}


app = NoOp.bind()
