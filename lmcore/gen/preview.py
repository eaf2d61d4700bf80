"""A few completions printed as lines: `lmcore generate --prompt TEXT` without an output folder."""

from __future__ import annotations

from lmcore.checkpoint import resolve
from lmcore.config import Config
from lmcore.errors import ConfigError
from lmcore.gen.decoder import Decoder
from lmcore.gen.prompts import PromptSource
from lmcore.gen.sampling import SamplingParams, row_key, row_uniforms
from lmcore.runtime.precision import auto_precision


def preview(cfg: Config, prompt_texts: list[str] | None = None) -> list[str]:
    """Completions of the given texts, else of generate.prompts' first lines, else
    generate.num_samples unconditional ones: 'PROMPT >>> COMPLETION' per line."""
    g = cfg.generate
    model, tok = resolve(g.checkpoint or cfg.run.dir, cfg.run.dir).build_model()
    texts = list(prompt_texts or [])
    for t in texts:
        if len(t.split()) > g.max_prompt_words:
            raise ConfigError(f"--prompt has {len(t.split())} words, more than generate.max_prompt_words="
                              f"{g.max_prompt_words}; shorten it, or raise generate.max_prompt_words")
    if not texts and g.prompts:
        texts = [r.text for r in PromptSource(g.prompts, max_words=g.max_prompt_words).records()]
    if not texts:
        texts = [""] * g.num_samples
    precision = g.precision if g.precision != "auto" else auto_precision("cpu")
    decoder = Decoder(model, tok, SamplingParams(g.temperature, g.top_k, g.top_p, g.max_new_tokens),
                      precision=precision)
    uniforms = row_uniforms([row_key(g.seed, i) for i in range(len(texts))], max(g.max_new_tokens, 1))
    done = decoder.generate([tok.encode(t) for t in texts], uniforms)
    return [f"{t} >>> {tok.decode(c.token_ids)}".strip() for t, c in zip(texts, done, strict=True)]
