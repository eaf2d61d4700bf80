"""The model's state and loss, and how reviews become batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmcore.config import ModelConfig
from lmcore.data.batching import IGNORE, PackedBatches, PaddedBatches, review_rows, rows_to_batch
from lmcore.data.cache import TokenizedSplit
from lmcore.loss import adaptive_cross_entropy
from lmcore.model import LSTMLM

BOS, EOS, PAD = 2, 3, 1
SPECIAL = {"bos": BOS, "eos": EOS, "pad": PAD}


def corpus(lengths: list[int]) -> TokenizedSplit:
    docs = [np.arange(10, 10 + n, dtype=np.int32) + i for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedSplit(np.concatenate(docs), offsets)


def test_padded_rows_put_eos_right_after_the_last_word_and_never_score_padding():
    rows = review_rows([np.array([7, 8, 9]), np.array([5, 6, 7, 8, 9, 10])], BOS, EOS, PAD, truncate=4)
    assert rows.tolist() == [[BOS, 7, 8, 9, EOS, PAD], [BOS, 5, 6, 7, 8, EOS]]
    batch = rows_to_batch(rows, PAD)
    assert batch.targets.tolist() == [[7, 8, 9, EOS, IGNORE], [5, 6, 7, 8, EOS]]
    assert batch.num_targets == 9  # 3 + 4 words and one <eos> each


def test_packed_and_padded_score_the_same_tokens_over_an_epoch():
    split = corpus([5, 9, 3, 12, 7, 4, 8, 6])
    padded = PaddedBatches(split, batch_size=2, truncate=0, special=SPECIAL, seed=0)
    n_padded = sum(padded.get(0, i).num_targets for i in range(padded.steps_per_epoch))
    assert n_padded == sum([5, 9, 3, 12, 7, 4, 8, 6]) + 8  # words + one <eos> per review
    packed = PackedBatches(split, batch_size=2, seq_len=4, truncate=0, special=SPECIAL, seed=0)
    batches = [packed.get(0, i) for i in range(packed.steps_per_epoch)]
    assert all((b.inputs != PAD).all() for b in batches)  # no padding at all
    assert all((b.targets != BOS).all() for b in batches)  # the next review's <bos> is not scored
    assert [b.carries_state for b in batches] == [False] + [True] * (len(batches) - 1)
    # Consecutive windows continue the same rows: window k+1 starts where window k's targets end.
    for a, b in zip(batches, batches[1:], strict=False):
        assert a.targets[:, -1][a.targets[:, -1] != IGNORE].tolist() == \
            b.inputs[:, 0][a.targets[:, -1] != IGNORE].tolist()


def test_ranks_share_each_global_batch_without_overlap():
    split = corpus([3] * 20)
    seen = []
    for rank in (0, 1):
        b = PaddedBatches(split, batch_size=4, truncate=0, special=SPECIAL, seed=1, rank=rank, world=2)
        assert b.steps_per_epoch == 3  # 20 reviews / 8 per global batch: 2 full + a tail of 4
        for i in range(b.steps_per_epoch):
            seen.extend(b.get(0, i).inputs[:, 1].tolist())  # first word identifies the review
    assert sorted(seen) == sorted(10 + i for i in range(20))


def test_epochs_reshuffle_and_a_given_epoch_is_reproducible():
    split = corpus([3] * 16)
    a = PaddedBatches(split, batch_size=4, truncate=0, special=SPECIAL, seed=0)
    b = PaddedBatches(split, batch_size=4, truncate=0, special=SPECIAL, seed=0)
    assert torch.equal(a.get(1, 2).inputs, b.get(1, 2).inputs)
    assert not torch.equal(a.get(0, 0).inputs, a.get(1, 0).inputs)


def small_model(**kw) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(50, ModelConfig(embedding_dim=8, hidden_dim=12, **kw), pad_id=PAD)


def test_state_carried_through_forward_equals_one_long_pass():
    model = small_model(num_layers=2)
    ids = torch.randint(4, 50, (3, 10))
    whole = model(ids).logits
    first = model(ids[:, :6])
    second = model(ids[:, 6:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole)


def test_loss_counts_real_targets_only():
    model = small_model()
    ids = torch.randint(4, 50, (1, 6))
    targets = torch.randint(4, 50, (1, 6))
    short = model(ids, targets=targets)
    padded_ids = torch.cat([ids, torch.full((1, 4), PAD)], 1)
    padded_targets = torch.cat([targets, torch.full((1, 4), IGNORE)], 1)
    long = model(padded_ids, targets=padded_targets)
    assert short.num_targets == long.num_targets == 6
    torch.testing.assert_close(short.loss_sum, long.loss_sum)
    full = torch.nn.functional.cross_entropy(model(ids).logits[0], targets[0], reduction="sum")
    torch.testing.assert_close(short.loss_sum, full)


def test_tied_weights_share_one_tensor_even_when_sizes_differ():
    model = small_model(tie_weights=True)
    assert model.head.weight is model.embedding.weight
    assert model.proj is not None and model.proj.out_features == 8


def test_the_chunked_loss_matches_plain_cross_entropy_in_value_and_gradients():
    from lmcore.loss import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(101, 16, requires_grad=True)
    b = torch.randn(101, requires_grad=True)
    t = torch.randint(0, 101, (37,))
    results = []
    for chunk in (0, 8, 1000):  # plain, several chunks with a short last one, one chunk
        for p in (h, w, b):
            p.grad = None
        loss = linear_cross_entropy(h, w, b, t, chunk)
        (loss * 0.5).backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone()))
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # eval: no gradients are computed or kept
        assert linear_cross_entropy(h, w, b, t, 8).item() == pytest.approx(results[0][0].item(), rel=1e-5)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_the_forward_only_loss_over_column_blocks_matches_plain_cross_entropy(with_bias):
    """Eval's loss (no gradients): the logits COLS columns at a time, each block's log-sum-exp
    then combined, give plain cross-entropy's value, over several blocks and a short last one, in fp32 and,
    to bf16's rounding of the logits, under bf16 autocast, as the training forward does."""
    from lmcore.loss import COLS, linear_cross_entropy

    torch.manual_seed(2)
    vocab = 2 * COLS + 37
    h = torch.randn(45, 16) * 2
    w = torch.randn(vocab, 16, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True) if with_bias else None
    t = torch.randint(0, vocab, (45,))
    t[:3] = torch.tensor([0, COLS - 1, vocab - 1])  # targets at the blocks' edges
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t, reduction="sum")
    with torch.no_grad():
        for chunk in (8, 128):
            got = linear_cross_entropy(h, w, b, t, chunk)
            assert got.item() == pytest.approx(want.item(), rel=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_eval = linear_cross_entropy(h, w, b, t, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_train = linear_cross_entropy(h, w, b, t, 8)
    # (measured over seeds 2-7: each 0.5e-5 to 4.6e-4 off fp32's, the two as far from each other)
    assert bf16_eval.item() != want.item() and bf16_eval.item() == pytest.approx(want.item(), rel=1e-3)
    assert bf16_train.item() == pytest.approx(want.item(), rel=1e-3)


@pytest.mark.parametrize("spread", [1.0, 50.0], ids=["narrow", "wide"])
def test_eval_loss_is_float64s_to_float32_rounding_however_wide_the_logits(spread):
    """Each block's log-sum-exp comes from its log-softmax at one column (lmcore/loss.py lse_):
    exact to float32 rounding also where logits span thousands (measured 1e-8 to 9e-8)."""
    from lmcore.loss import COLS, linear_cross_entropy

    torch.manual_seed(3)
    vocab = 2 * COLS + 37
    h, w = torch.randn(300, 16) * spread, torch.randn(vocab, 16)
    t = torch.randint(0, vocab, (300,))
    for b in (torch.randn(vocab) * 3, None):
        want = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double()), t,
            reduction="sum")
        with torch.no_grad():
            got = linear_cross_entropy(h, w, b, t, 64)
        assert got.item() == pytest.approx(want.item(), rel=5e-7)


def test_a_word_whose_bias_is_minus_infinity_is_no_nan_in_a_bf16_eval():
    """The bias rides in a bf16 matmul as its rounding and what that left (lmcore/loss.py
    _fold_bias_split); a word at -inf has nothing left, not -inf - -inf."""
    from lmcore.loss import linear_cross_entropy

    torch.manual_seed(4)
    h, w, b = torch.randn(40, 16), torch.randn(3000, 16), torch.randn(3000)
    b[10] = float("-inf")
    t = torch.randint(11, 3000, (40,))
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t, reduction="sum")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, b, t, 8)
    assert got.item() == pytest.approx(want.item(), rel=1e-3)


def test_the_fused_loss_without_bias_and_under_bf16_autocast_matches_the_plain_one():
    from lmcore.loss import linear_cross_entropy

    torch.manual_seed(1)
    h = torch.randn(29, 16, requires_grad=True)
    w = torch.randn(53, 16, requires_grad=True)
    t = torch.randint(0, 53, (29,))
    for autocast in (False, True):
        grads = []
        for chunk in (0, 7):
            h.grad = w.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = linear_cross_entropy(h, w, None, t, chunk)
            loss.backward()
            grads.append((loss.detach().float(), h.grad.clone(), w.grad.clone()))
        tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
        for x, y in zip(*grads, strict=True):
            torch.testing.assert_close(x, y, **tol)
    loss = linear_cross_entropy(h, w, None, t, 7)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):  # its buffers were scaled in place
        loss.backward()


@pytest.mark.parametrize("dtypes", [("fp16", "fp16", "fp16"), ("bf16", "bf16", "bf16"),
                                    ("fp16", None, "fp16"), (None, "bf16", "fp16"), (None, "fp16", None)])
def test_each_matmul_of_the_fused_loss_in_its_own_precision_stays_close_to_fp32(dtypes):
    """train.loss_precision: each of the forward, input-gradient and weight-gradient matmuls
    in fp32, bf16 or fp16 (fp16's gradient scaled): loss and gradients near the fp32 ones on a
    vocabulary large enough that most probabilities are far below fp16's smallest normal."""
    from lmcore.loss import linear_cross_entropy

    names = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}
    torch.manual_seed(2)
    # 300 rows: the last 128-row chunk has 44, padded to 48 where a matmul is bf16 or fp16
    h = torch.tanh(torch.randn(300, 64)).requires_grad_()  # an LSTM's output: in (-1, 1)
    w = (torch.randn(5000, 64) * 0.3).requires_grad_()
    b = (torch.randn(5000) * 0.1).requires_grad_()
    t = torch.randint(0, 5000, (300,))
    out = []
    for d in (None, tuple(names[x] for x in dtypes)):
        for x in (h, w, b):
            x.grad = None
        loss = linear_cross_entropy(h, w, b, t, 128, d)
        loss.backward()
        out.append((loss.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone()))
    (loss32, *grads32), (loss_lo, *grads_lo) = out
    assert loss_lo.dtype == torch.float32 and abs(loss_lo / loss32 - 1) < 5e-3
    for g32, g_lo in zip(grads32, grads_lo, strict=True):
        assert g_lo.dtype == torch.float32 and (g_lo - g32).norm() / g32.norm() < 2e-2


@pytest.mark.parametrize("group_rows", [128, 384, 512, 4096])
def test_a_bf16_weight_gradient_over_groups_of_chunks_counts_every_row_once(monkeypatch, group_rows):
    """bf16's weight gradient sums the softmax gradients of several chunks in one matmul
    (loss.GRAD_W_ROWS): 1,100 rows in 128-row chunks make groups of 1, 3, 4 or all 9 chunks, the
    last one short (76 rows, padded to 80). A row left out or counted twice would move the
    weight gradient far more than bf16's rounding does."""
    import lmcore.loss as loss_mod

    monkeypatch.setattr(loss_mod, "GRAD_W_ROWS", group_rows)
    torch.manual_seed(5)
    h = torch.tanh(torch.randn(1100, 32)).requires_grad_()
    w = (torch.randn(3000, 32) * 0.3).requires_grad_()
    b = (torch.randn(3000) * 0.1).requires_grad_()
    t = torch.randint(0, 3000, (1100,))
    grads = []
    for d in ((None,) * 3, (torch.bfloat16,) * 3):
        h.grad = w.grad = b.grad = None
        loss_mod.linear_cross_entropy(h, w, b, t, 128, d).backward()
        grads.append((h.grad.clone(), w.grad.clone(), b.grad.clone()))
    for g32, g16 in zip(*grads, strict=True):
        assert (g16 - g32).norm() / g32.norm() < 1e-2


def test_all_fp32_given_explicitly_is_bit_identical_and_low_precision_works_without_bias_and_with_bf16_h():
    from lmcore.loss import linear_cross_entropy

    torch.manual_seed(3)
    w = (torch.randn(700, 24) * 0.3).requires_grad_()
    b = (torch.randn(700) * 0.1).requires_grad_()
    t = torch.randint(0, 700, (50,))
    h = torch.tanh(torch.randn(50, 24)).requires_grad_()
    runs = []
    for dtypes in (None, (None, None, None)):
        h.grad = w.grad = b.grad = None
        linear_cross_entropy(h, w, b, t, 16, dtypes).backward()
        runs.append((h.grad.clone(), w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))
    # no bias, and h in bf16 (an LSTM under autocast) with fp32 weights
    h16 = torch.tanh(torch.randn(50, 24)).bfloat16().requires_grad_()
    for dtypes in ((torch.float16, None, torch.bfloat16), (None, torch.float16, torch.float16)):
        ref = linear_cross_entropy(h16.detach().float(), w.detach(), None, t, 16)
        loss = linear_cross_entropy(h16, w, None, t, 16, dtypes)
        loss.backward()
        assert h16.grad.dtype == torch.bfloat16 and abs(loss.item() / ref.item() - 1) < 1e-2
        h16.grad = w.grad = None


def test_fp16_gradients_are_scaled_so_that_rare_words_keep_their_gradient(monkeypatch):
    """Words nobody predicts (probability ~1e-8 in every row, below fp16's smallest normal
    6e-5 and near its smallest subnormal 6e-8) get their weight-gradient rows only from those
    probabilities. Scaled before the cast (x256 here) the rows stay within 1% of fp32's;
    unscaled they are off by a third (measured: 0.16% against 33%)."""
    import lmcore.loss as loss_mod

    torch.manual_seed(4)
    h = torch.tanh(torch.randn(128, 32))
    w = torch.randn(5000, 32) * 0.3
    rare = torch.arange(50, 5000)
    b = torch.zeros(5000)
    b[rare] = -14.0
    t = torch.randint(0, 50, (128,))

    def rare_rows(dtypes):
        wg = w.clone().requires_grad_()
        loss_mod.linear_cross_entropy(h, wg, b, t, 128, dtypes).backward()
        return wg.grad[rare]

    exact = rare_rows(None)
    assert loss_mod.fp16_grad_scale(128, h, w) == 256.0
    scaled = rare_rows((None, None, torch.float16))
    monkeypatch.setattr(loss_mod, "fp16_grad_scale", lambda *a: 1.0)
    unscaled = rare_rows((None, None, torch.float16))

    def err(g) -> float:  # the median row's relative error
        return float(((g - exact).norm(dim=1) / exact.norm(dim=1)).median())

    assert err(scaled) < 0.01 and err(unscaled) > 0.1, (err(scaled), err(unscaled))


def test_the_adaptive_softmax_is_a_normalised_distribution_and_scores_like_its_logits():
    model = small_model(softmax="adaptive", adaptive_cutoffs=[10, 30], adaptive_div=2.0)
    ids = torch.randint(4, 50, (2, 7))
    targets = torch.randint(0, 50, (2, 7))
    logp = model(ids).logits  # exact log-probabilities over all 50 words
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 7))
    out = model(ids, targets=targets)
    expected = -logp.gather(-1, targets.unsqueeze(-1)).sum()
    torch.testing.assert_close(out.loss_sum, expected, rtol=1e-5, atol=1e-4)


def test_the_adaptive_loss_is_torchs_in_fp32_and_close_to_it_under_bf16_autocast():
    torch.manual_seed(0)
    m = torch.nn.AdaptiveLogSoftmaxWithLoss(32, 500, [40, 200], div_value=2.0)
    h = torch.randn(301, 32, requires_grad=True)  # not a multiple of the 64 rows bf16 pads to
    t = torch.cat([torch.randint(0, 40, (200,)), torch.randint(40, 500, (101,))])
    theirs = -m(h, t).output.sum()
    ours = adaptive_cross_entropy(m, h, t)
    expected = torch.autograd.grad(theirs, params := [h, *m.parameters()], retain_graph=True)
    assert torch.equal(ours, theirs)  # the same steps, bit for bit
    for a, b in zip(torch.autograd.grad(ours, params), expected, strict=True):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torch's own fails here (bf16 log-softmax)
        low = adaptive_cross_entropy(m, h, t)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, theirs, rtol=2e-3, atol=0.0)
    for a, b in zip(torch.autograd.grad(low, params), expected, strict=True):
        assert (a - b).norm() < 0.02 * b.norm()  # bf16's 8 bits, entry by entry; close as a whole
    with pytest.raises(IndexError, match="outside"):
        adaptive_cross_entropy(m, h[:2], torch.tensor([0, 500]))
