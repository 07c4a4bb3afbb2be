"""Modules of the toy-detection demo (``examples/toy_detection.py``): data, model, train,
evaluate, plots."""
