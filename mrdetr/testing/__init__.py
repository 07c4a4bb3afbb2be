"""Fixtures for tests, examples and benchmarks: small random-init models and random batches.

Not part of the training API: :mod:`mrdetr.testing.hf_models` builds tiny HF transformers
detectors (no downloads; transformers is imported when a builder is called) that users can also
start toy experiments from.
"""
