"""lmcore: train, evaluate and bulk-generate with a word-level LSTM language model."""

__version__ = "0.1.0"
