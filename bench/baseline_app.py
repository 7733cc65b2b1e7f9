"""The single-image design earlier emotion APIs used: one FastAPI process, one forward pass per
request, same model and preprocessing as the Serve application. Baseline for bench/serving.py.

    uvicorn bench.baseline_app:app --port 8001
"""

from fastapi import FastAPI, HTTPException, UploadFile

from emotion.predictor import Predictor

app = FastAPI(title="baseline")
predictor = Predictor(device="cpu")


@app.get("/health")
def health() -> dict:
    """What bench/serving.py prints beside the Serve replicas' own /health: the precision chosen."""
    return {"precision": predictor.precision}


@app.post("/predict")
def predict(file: UploadFile) -> dict:
    result = predictor.predict_bytes([file.file.read()])[0]
    if result["status"] == "error":
        raise HTTPException(400, result["error"])
    return result
