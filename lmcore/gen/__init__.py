"""Generation: the decoder, sampling, and the bulk job that writes generations to files.

    decoder    Decoder: prompts read once, LSTM state carried, rows batched; fp32 / bf16 / int8
    sampling   per-row random streams and the draw of one token per row (temperature, top-k/p)
    prompts    PromptSource: a prompts file streamed and checked once
    folder     the output folder: its layout, shards, chunks and params.json
    job        generate_shard: one process's share of the bulk job, resumable
    merge      merge_outputs: every chunk checked, one file in input order plus a manifest
    preview    a few completions as lines (`lmcore generate --prompt`)
"""

__all__ = ["decoder", "sampling", "prompts", "folder", "job", "merge", "preview"]
