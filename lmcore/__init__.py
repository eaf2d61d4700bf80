"""lmcore: train, evaluate and bulk-generate with a word-level LSTM language model."""

__version__ = "0.2.0"
