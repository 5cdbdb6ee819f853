"""Sampling rules on worked numbers, and parity with Hugging Face's logits processors on random logits."""

import pytest
import torch

from lmforge.infer.generate import GenerationConfig
from lmforge.infer.sampling import (apply_repetition_penalty, apply_temperature, greedy, sample, sample_next,
                                    token_presence, top_k_filter, top_p_filter, warp_logits)

INF = float("inf")


def test_temperature_divides_logits():
    assert apply_temperature(torch.tensor([[1.0, 2.0, 3.0]]), 2.0).tolist() == [[0.5, 1.0, 1.5]]


def test_top_k_keeps_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 3.0, 0.0]])
    assert top_k_filter(logits, 2)[0].tolist() == [-INF, 3.0, 2.0, -INF]
    assert top_k_filter(logits, 1)[1].tolist() == [-INF, 3.0, 3.0, -INF]  # ties with the k-th survive
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_nucleus_and_at_least_one():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # ascending cumulative mass 0.05, 0.2, 0.5, 1.0: p=0.7 removes tokens with cumulative <= 0.3
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.4)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    present = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, present, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_token_presence_excludes_padding():
    ids = torch.tensor([[1, 1, 2], [3, 0, 0]])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    present = token_presence(ids, 5, mask)
    assert present.tolist() == [[False, True, True, False, False], [True, False, False, True, False]]
    # the padding column holding id 1 must not hide the real 1 that follows it
    assert token_presence(torch.tensor([[4, 2]]), 5, torch.tensor([[False, True]])).tolist() == \
        [[False, False, True, False, False]]


def test_greedy_and_temperature_zero():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert greedy(logits).tolist() == [1, 0]
    present = torch.tensor([[False, False, False], [True, False, False]])
    cfg = GenerationConfig(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, cfg, present=present).tolist() == [1, 2]  # row 1: 3.0 -> 1.5 < 2.9


def test_sample_never_draws_filtered_tokens_and_is_seeded():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    kept = top_k_filter(logits, 3)
    draws = torch.stack([sample(kept, torch.Generator().manual_seed(s)) for s in range(200)], 1)  # (2, 200)
    assert torch.isfinite(kept.gather(1, draws)).all()
    again = torch.stack([sample(kept, torch.Generator().manual_seed(s)) for s in range(200)], 1)
    assert torch.equal(draws, again)


def test_sample_frequencies_follow_softmax():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    draws = sample(probs.log().expand(20000, 3), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, probs[0], atol=0.02)


@pytest.fixture
def hf():
    return pytest.importorskip("transformers.generation")


def _random_case(seed: int = 0, batch: int = 4, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3, torch.randint(0, vocab, (batch, 12), generator=g)


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_hf(hf, temperature):
    logits, ids = _random_case()
    expected = hf.TemperatureLogitsWarper(temperature)(ids, logits.clone())
    torch.testing.assert_close(apply_temperature(logits, temperature), expected)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_hf(hf, k):
    logits, ids = _random_case(1)
    assert torch.equal(top_k_filter(logits, k), hf.TopKLogitsWarper(k)(ids, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.99])
def test_top_p_matches_hf(hf, p):
    logits, ids = _random_case(2)
    assert torch.equal(top_p_filter(logits, p), hf.TopPLogitsWarper(p)(ids, logits.clone()))


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty_matches_hf(hf, penalty):
    logits, ids = _random_case(3)
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    ours = apply_repetition_penalty(logits, token_presence(ids, logits.shape[-1]), penalty)
    torch.testing.assert_close(ours, expected)


def test_full_chain_matches_hf_processor_list(hf):
    logits, ids = _random_case(4)
    cfg = GenerationConfig(temperature=0.8, top_k=10, top_p=0.85, repetition_penalty=1.2)
    processors = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(1.2), hf.TemperatureLogitsWarper(0.8),
                                         hf.TopKLogitsWarper(10), hf.TopPLogitsWarper(0.85)])
    expected = processors(ids, logits.clone())
    ours = warp_logits(logits, cfg, token_presence(ids, logits.shape[-1]))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    torch.testing.assert_close(ours, expected)
