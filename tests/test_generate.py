"""Sampling: stateful, batched, deterministic per row, never a banned token."""

from __future__ import annotations

import torch

from lmcore.config import ModelConfig
from lmcore.generate import SamplingParams, generate_batch, row_generator, sample_next
from lmcore.model import LSTMLM
from lmcore.tokenizer import WordTokenizer

TOK = WordTokenizer([f"w{i}" for i in range(40)])


def model() -> LSTMLM:
    torch.manual_seed(0)
    m = LSTMLM(len(TOK), ModelConfig(embedding_dim=8, hidden_dim=16), TOK.pad_id).eval()
    with torch.no_grad():  # make the banned tokens the most likely: masking must still hold
        m.head.bias[[TOK.unk_id, TOK.pad_id, TOK.bos_id]] += 10.0
    return m


def test_greedy_is_argmax_of_a_full_prefix_rerun():
    m = model()
    prompt = [TOK.stoi["w3"], TOK.stoi["w7"]]
    [out] = generate_batch(m, TOK, [prompt], [row_generator(0, 0)], SamplingParams(0.0, max_new_tokens=8))
    ids = [TOK.bos_id, *prompt]
    expected = []
    for _ in range(8):  # the notebook's way: re-run everything, take the best allowed token
        logits = m(torch.tensor([ids])).logits[0, -1]
        logits[[TOK.unk_id, TOK.pad_id, TOK.bos_id]] = float("-inf")
        nxt = int(logits.argmax())
        if nxt == TOK.eos_id:
            break
        expected.append(nxt)
        ids.append(nxt)
    assert out.token_ids == expected


def test_top_k_1_equals_greedy_and_banned_tokens_never_appear():
    m = model()
    prompts = [[TOK.stoi[f"w{i}"]] for i in range(6)]
    gens = lambda: [row_generator(1, i) for i in range(6)]  # noqa: E731
    greedy = generate_batch(m, TOK, prompts, gens(), SamplingParams(0.0, max_new_tokens=10))
    top1 = generate_batch(m, TOK, prompts, gens(), SamplingParams(1.5, top_k=1, max_new_tokens=10))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in top1]
    sampled = generate_batch(m, TOK, prompts * 20, [row_generator(2, i) for i in range(120)],
                             SamplingParams(2.0, max_new_tokens=20))
    seen = {t for c in sampled for t in c.token_ids}
    assert not seen & {TOK.unk_id, TOK.pad_id, TOK.bos_id}
    assert len(seen) > 10  # it did sample, not collapse


def test_a_rows_output_does_not_depend_on_its_batch():
    m = model()
    prompts = [[TOK.stoi[f"w{i}"]] * (1 + i % 3) for i in range(8)]
    params = SamplingParams(1.0, top_p=0.9, max_new_tokens=12)
    together = generate_batch(m, TOK, prompts, [row_generator(5, i) for i in range(8)], params)
    alone = [generate_batch(m, TOK, [p], [row_generator(5, i)], params)[0] for i, p in enumerate(prompts)]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert {c.finish_reason for c in together} <= {"eos", "length"}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.0001, 0.0001, 0.0001, 0.0001, 0.5, 0.3, 0.2]]))
    picks = {int(sample_next(logits.clone(), torch.tensor([u]), SamplingParams(1.0, top_p=0.75), [0, 1, 2]))
             for u in torch.linspace(0, 0.999, 200).tolist()}
    assert picks == {4, 5}
