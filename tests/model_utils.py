"""Hand-made batches for model tests."""

from feature_store.batch import make_batch, split_batch  # noqa: F401
