"""MLflow tracking of a training run, the way Ray Train suggests for any tracker: the native
library, called from the rank-0 worker only, so a run with N workers logs once.

A run resumed across sessions continues the same MLflow run (its id travels in the Ray Train
checkpoint), so its metrics form one curve. mlflow is an optional extra
(`pip install emotion-ray[mlflow]`), imported only when tracking is asked for.
"""

import json
import os
from typing import Any

from emotion.checkpoint import Checkpoint
from emotion.training.card import model_card


def _params(recipe: dict[str, Any]) -> dict[str, str]:
    """The recipe as MLflow parameters: nested values as JSON, so they read back as written."""
    return {key: json.dumps(value) if isinstance(value, dict | list) else str(value) for key, value in recipe.items()}


def _connect(uri: str) -> None:
    """Point MLflow at `uri`. A local folder (a file URI) is MLflow's file store, which MLflow 3
    keeps in maintenance and refuses unless allowed: allowed here, since a folder beside the
    project (`mlflow ui --backend-store-uri ./mlruns`) is what a user asking for one expects."""
    import mlflow

    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)


def start_run(uri: str, experiment: str, name: str, recipe: dict[str, Any], run_id: str | None = None) -> str:
    """Start (or, given `run_id`, continue) the MLflow run of a training run; its id."""
    import mlflow

    _connect(uri)
    if run_id is None:
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=name)
        mlflow.log_params(_params(recipe))
    else:
        run = mlflow.start_run(run_id=run_id)
    return run.info.run_id


def log_epoch(metrics: dict[str, float]) -> None:
    """One finished epoch's metrics, stepped by epoch."""
    import mlflow

    values = {k: float(v) for k, v in metrics.items() if k not in ("epoch", "done")}
    mlflow.log_metrics(values, step=int(metrics["epoch"]))


def end_run() -> None:
    """Close the active run (an invocation may end before the schedule does; resuming reopens it)."""
    import mlflow

    mlflow.end_run()


def log_result(uri: str, run_id: str, checkpoint_path: str, checkpoint: Checkpoint) -> None:
    """Attach the delivered checkpoint (a local copy of the file, `checkpoint_path`) and its model
    card to the run."""
    import mlflow

    _connect(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifact(checkpoint_path, artifact_path="model")
        mlflow.log_text(model_card(checkpoint), "model/model-card.md")
