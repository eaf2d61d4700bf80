"""Data: where texts come from, the vocabulary, token ids cached on disk, training batches.

    sources        Split: one split of data.source (hub, files, aclImdb, the sample), read once
    sample_corpus  the built-in synthetic reviews (offline default and test data)
    tokenizer      WordTokenizer: the notebook's lowercase whitespace tokenizer, as JSON
    cache          load_corpus, load_split: token ids encoded once, then memory-mapped
    batching       PaddedBatches, PackedBatches, eval_batches: random access by (epoch, index)
"""

__all__ = ["sources", "sample_corpus", "tokenizer", "cache", "batching"]
