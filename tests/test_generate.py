"""Sampling: stateful, batched, deterministic per row, never a banned token, the right
distribution (plain, top-k, top-p), and a row's output independent of its batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.data.tokenizer import WordTokenizer
from lmcore.errors import ConfigError
from lmcore.gen.decoder import Decoder
from lmcore.gen.sampling import CHUNK, SamplingParams, row_key, row_uniforms
from lmcore.model import LSTMLM
from tests.conftest import needs_native

TOK = WordTokenizer([f"w{i}" for i in range(40)])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small workloads: one thread is faster (and OpenMP barriers on a busy machine are slow).
    Results do not depend on the thread count (test_generate_job runs subprocesses with more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
BANNED = [TOK.unk_id, TOK.pad_id, TOK.bos_id]


def complete(m: LSTMLM, prompts: list[list[int]], params: SamplingParams, seed: int = 0,
             ids: list[int] | None = None):
    """The decoder on these prompts, row i drawing from the stream of (seed, ids[i], sample 0)."""
    keys = [row_key(seed, i) for i in (ids if ids is not None else range(len(prompts)))]
    return Decoder(m, TOK, params).generate(prompts, row_uniforms(keys, max(params.max_new_tokens, 1)))


def model(tok: WordTokenizer = TOK, **cfg) -> LSTMLM:
    torch.manual_seed(0)
    arch = {"embedding_dim": 8, "hidden_dim": 16, **cfg}
    m = LSTMLM(len(tok), ModelConfig(**arch), tok.pad_id).eval()
    with torch.no_grad():  # make the banned tokens the most likely: masking must still hold
        if m.adaptive is None:
            m.head.bias[[tok.unk_id, tok.pad_id, tok.bos_id]] += 10.0
        else:
            m.adaptive.head.bias = torch.nn.Parameter(torch.zeros(m.adaptive.head.out_features))
            m.adaptive.head.bias[[tok.unk_id, tok.pad_id, tok.bos_id]] += 10.0
    return m


def test_greedy_is_argmax_of_a_full_prefix_rerun():
    m = model()
    prompt = [TOK.stoi["w3"], TOK.stoi["w7"]]
    [out] = complete(m, [prompt], SamplingParams(0.0, max_new_tokens=8))
    ids = [TOK.bos_id, *prompt]
    expected = []
    for _ in range(8):  # the notebook's way: re-run everything, take the best allowed token
        logits = m(torch.tensor([ids])).logits[0, -1]
        logits[BANNED] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == TOK.eos_id:
            break
        expected.append(nxt)
        ids.append(nxt)
    assert out.token_ids == expected


def test_top_k_1_equals_greedy_and_banned_tokens_never_appear():
    m = model()
    prompts = [[TOK.stoi[f"w{i}"]] for i in range(6)]
    greedy = complete(m, prompts, SamplingParams(0.0, max_new_tokens=10), seed=1)
    top1 = complete(m, prompts, SamplingParams(1.5, top_k=1, max_new_tokens=10), seed=1)
    assert [c.token_ids for c in greedy] == [c.token_ids for c in top1]
    for params in (SamplingParams(2.0, max_new_tokens=20), SamplingParams(2.0, top_k=30, max_new_tokens=20),
                   SamplingParams(2.0, top_p=0.95, max_new_tokens=20)):
        sampled = complete(m, prompts * 20, params, seed=2)
        seen = {t for c in sampled for t in c.token_ids}
        assert not seen & set(BANNED)
        assert len(seen) > 10  # it did sample, not collapse


def test_a_rows_output_does_not_depend_on_its_batch():
    m = model()
    prompts = [[TOK.stoi[f"w{i}"]] * (1 + i % 3) for i in range(8)]
    params = SamplingParams(1.0, top_p=0.9, max_new_tokens=12)
    together = complete(m, prompts, params, seed=5)
    alone = [complete(m, [p], params, seed=5, ids=[i])[0] for i, p in enumerate(prompts)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert {c.finish_reason for c in together} <= {"eos", "length"}


BIG = WordTokenizer([f"w{i}" for i in range(3 * CHUNK + 100)])  # several sampling chunks


ADAPTIVE = {"softmax": "adaptive", "adaptive_cutoffs": [500, 3000]}


@pytest.mark.parametrize(("arch", "precision"), [
    ({}, "fp32"), pytest.param({}, "bf16", marks=needs_native("bf16")), ({}, "int8"),
    ({"num_layers": 2, "tie_weights": True}, "fp32"),
    ({"num_layers": 2, "tie_weights": True}, "int8"),
    (ADAPTIVE, "fp32"), pytest.param(ADAPTIVE, "bf16", marks=needs_native("bf16"))],
    ids=["plain", "plain-bf16", "plain-int8", "2-layer-tied-proj", "tied-proj-int8", "adaptive",
         "adaptive-bf16"])
def test_bit_identical_whatever_the_batching(arch, precision):
    """The same rows alone, in batches of 5 and all 20 at once, shuffled: the same tokens,
    bit for bit (matmuls of 1 row would take another kernel: the decoder pads to 16)."""
    m = model(BIG, **arch)
    rng = np.random.default_rng(0)
    n, steps = 20, 6
    prompts = [rng.integers(4, len(BIG), size=int(rng.integers(0, 9))).tolist() for _ in range(n)]
    modes = [SamplingParams(1.0, max_new_tokens=steps), SamplingParams(0.0, max_new_tokens=steps),
             SamplingParams(0.7, top_k=40, max_new_tokens=steps),
             SamplingParams(1.3, top_p=0.8, max_new_tokens=steps)]
    for params in modes:
        dec = Decoder(m, BIG, params, precision=precision)
        u = row_uniforms([row_key(3, i) for i in range(n)], steps)
        whole = [c.token_ids for c in dec.generate(prompts, u)]
        for size in (1, 5):
            order = rng.permutation(n)
            got = {}
            for s in range(0, n, size):
                part = order[s:s + size]
                for i, c in zip(part, dec.generate([prompts[i] for i in part], u[part]), strict=True):
                    got[int(i)] = c.token_ids
            assert [got[i] for i in range(n)] == whole, (params, size)
        assert not {t for row in whole for t in row} & set(BANNED)


@pytest.mark.parametrize("arch", [{}, {"num_layers": 2, "tie_weights": True},
                                  {"softmax": "adaptive", "adaptive_cutoffs": [500, 3000]}],
                         ids=["plain", "2-layer-tied-proj", "adaptive"])
def test_the_decoders_lstm_and_output_layer_are_the_models(arch):
    """The decoder's own LSTM cell and output layer give LSTMLM.forward's logits (to float
    rounding), after each prompt and after feeding a token."""
    m = model(BIG, **arch)
    dec = Decoder(m, BIG, SamplingParams(1.0))
    prompts = [[5, 9, 300], [7], [], [6000, 1, 2, 3, 4]]
    hs, cs = dec._read(prompts)
    got = dec._logits(hs[-1])[: len(prompts), : len(BIG)].clone()  # the decoder reuses its buffer
    nxt = torch.tensor([11, 12, 13, 14])
    hs2, _ = dec._step(dec._pad_index_tokens(nxt), hs, cs)
    got2 = dec._logits(hs2[-1])[: len(prompts), : len(BIG)]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = m(torch.tensor([[BIG.bos_id, *p, int(nxt[i])]])).logits[0]
        for have, w in ((got[i], want[-2]), (got2[i], want[-1])):
            w = w.clone()
            w[BANNED] = float("-inf")
            if arch.get("softmax") == "adaptive":  # log-probabilities, up to a constant per row
                have, w = torch.log_softmax(have, 0), torch.log_softmax(w, 0)
            torch.testing.assert_close(have, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [{}, {"num_layers": 2, "tie_weights": True}], ids=["plain", "tied-proj"])
def test_int8_logits_stay_within_their_rounding_bound(arch):
    """int8 output layer: each logit is off from fp32 by at most what rounding the features
    (half a step) and the weights (half a step of the row's scale) can add up to."""
    m = model(BIG, **arch)
    exact, fast = Decoder(m, BIG, SamplingParams(1.0)), Decoder(m, BIG, SamplingParams(1.0), precision="int8")
    hs, _ = exact._read([[5, 9, 300], [7], [], [6000, 1, 2, 3, 4]])
    feat = hs[-1] if exact.proj is None else exact._mm(hs[-1], exact.proj)
    want = exact._logits(hs[-1]).clone()
    got = fast._logits(hs[-1])
    step = 1 / 127 if exact.proj is None else feat.abs().amax(dim=1, keepdim=True) / 127  # feature step
    w = exact.head_w.double()
    w_step = w.abs().amax(dim=1) / 127
    feat_q = torch.round(feat.double() / step) * step
    bound = (step / 2) * w.abs().sum(1) + (w_step / 2) * feat_q.abs().sum(1, keepdim=True) + 1e-5
    real = torch.isfinite(want)
    assert torch.equal(real, torch.isfinite(got))  # banned and padding columns stay -inf
    diff = (got.double() - want.double()).abs()
    assert bool((diff[real] <= bound.expand_as(diff)[real]).all()), float((diff - bound)[real].max())
    assert float(diff[real].max()) > 0  # it is a different computation, not fp32 renamed


@pytest.mark.parametrize(("arch", "precision"), [
    ({}, "int8"), pytest.param({}, "bf16", marks=needs_native("bf16")),
    pytest.param({"tie_weights": True}, "bf16", marks=needs_native("bf16"))],
                         ids=["int8", "bf16", "bf16-tied-proj"])
def test_plain_sampling_without_full_logits_draws_what_the_full_logits_give(arch, precision):
    """The fused sampler (chunk masses straight from the output matmul's int32 or bf16 result)
    picks the same tokens as writing out the float logits and sampling them, step after step."""
    m = model(BIG, **arch)
    params = SamplingParams(0.7, max_new_tokens=8)
    fused = Decoder(m, BIG, params, precision=precision)
    full = Decoder(m, BIG, params, precision=precision)
    full.fused = False
    assert fused.fused
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, len(BIG), size=int(rng.integers(0, 6))).tolist() for _ in range(300)]
    # 300 rows: three int8 matmuls of 128, two blocks of the fused pass's 256 (MASS_ROWS)
    u = row_uniforms([row_key(9, i) for i in range(300)], 8)
    got = [c.token_ids for c in fused.generate(prompts, u)]
    assert got == [c.token_ids for c in full.generate(prompts, u)]


def test_int8_refuses_the_adaptive_softmax():
    with pytest.raises(ConfigError, match="int8 is for the full softmax"):
        Decoder(model(BIG, softmax="adaptive", adaptive_cutoffs=[500, 3000]), BIG, SamplingParams(1.0),
                precision="int8")


def test_eos_ends_a_row_and_is_not_part_of_the_completion():
    m = model()
    with torch.no_grad():
        m.head.bias[TOK.eos_id] += 30.0  # eos first, always
    out = complete(m, [[4], [5, 6]], SamplingParams(1.0, max_new_tokens=5))
    assert [(c.token_ids, c.finish_reason) for c in out] == [([], "eos"), ([], "eos")]
    full = complete(m, [[4]], SamplingParams(1.0, max_new_tokens=0))
    assert full[0].finish_reason == "length" and full[0].token_ids == []


def test_int8_on_a_cpu_without_vnni_warns_that_fp32_is_faster(monkeypatch):
    """Without VNNI, torch._int_mm at the output layer's shape ran 4.0 GOP/s against fp32's 58 (an
    AVX2 CPU): int8 still runs (its sums are exact), with one line saying fp32 is faster there."""
    import warnings

    from lmcore.gen import decoder

    model = LSTMLM(50, ModelConfig(embedding_dim=8, hidden_dim=8), 1)
    monkeypatch.setattr(decoder, "cpu_has_vnni", lambda: False)
    with pytest.warns(UserWarning, match=r"^generate.precision=int8 on a CPU without VNNI: .* "
                                         r"generate.precision=fp32 is faster$"):
        Decoder.check(model, "int8", "cpu")
    monkeypatch.setattr(decoder, "cpu_has_vnni", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Decoder.check(model, "int8", "cpu")
