"""Evaluation of a model on labelled sets: metrics, the report a person reads, the run history and
the regression gate. Only `jobs.evaluate` uses it; the contract every entry point shares (labels,
preprocessing, models, checkpoints, the predictor) stays at the top of `emotion`."""
