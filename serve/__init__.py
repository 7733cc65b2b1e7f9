"""The Ray Serve application: HTTP/JSON over `emotion.Predictor`."""
