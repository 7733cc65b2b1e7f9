"""Training: what `jobs.train` runs on Ray Train workers. Only `jobs.train` imports this package;
the model contract every entry point shares (labels, preprocess, models, checkpoint, predictor)
stays at the top of `emotion/`."""
