"""Speculative decoding: greedy ids equal plain greedy generate's, sampled tokens follow the target's distribution
(chi-square against exact probabilities, with a negative control), prompt lookup, draft checks, the counts."""

import copy
from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import ConfigError, TokenizerMismatchError
from lmforge.infer import speculative
from lmforge.infer.generate import GenerationConfig, generate
from lmforge.infer.sampling import token_presence, warp_logits
from lmforge.infer.speculative import (check_draft, load_draft, prompt_lookup_proposal, speculative_generate,
                                       verify)
from lmforge.model import ModelConfig, Transformer
from test_generate import ByteTokenizer  # UTF-8 bytes as ids, with eos: text and stop strings, no training

VOCAB = 260
BLOCK = 48


def tiny(seed: int, vocab_size: int = VOCAB, block_size: int = BLOCK, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=vocab_size, block_size=block_size, d_model=32, **overrides)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def target() -> Transformer:
    return tiny(0, init_std=0.1)


@pytest.fixture(scope="module")
def drafts(target: Transformer) -> dict:
    """Drafters that agree with the target rarely (another random model), sometimes (a perturbed copy), always
    (the target itself), and prompt lookup."""
    perturbed = copy.deepcopy(target)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in perturbed.parameters():
            weight.add_(0.03 * torch.randn_like(weight))
    return {"other model": dict(draft=tiny(2, n_layer=1, init_std=0.1)), "perturbed copy": dict(draft=perturbed),
            "itself": dict(draft=target), "prompt lookup": dict(prompt_lookup=3)}


PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [30, 40, 50, 30, 40, 50, 30, 40], list(range(100, 120))]


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("drafter", ["other model", "perturbed copy", "itself", "prompt lookup"])
def test_greedy_ids_equal_plain_greedy_generate(target, drafts, drafter, k):
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.0, eos=False)  # 40 > room left by the 20-token prompt
    expected = generate(target, PROMPTS, cfg)
    completions, stats = speculative_generate(target, PROMPTS, cfg, num_draft_tokens=k, **drafts[drafter])
    assert completions == expected
    assert all(len(c.token_ids) == BLOCK - 20 for c in completions)  # generate's rule: the longest prompt fits
    if drafter == "itself":
        assert stats.accepted == stats.drafted > 0 and stats.acceptance_rate == 1.0
    if drafter == "perturbed copy":
        assert 0 < stats.accepted < stats.drafted


@pytest.mark.parametrize("drafter", ["perturbed copy", "prompt lookup"])
def test_greedy_with_eos_stop_strings_and_repetition_penalty_equals_generate(target, drafts, drafter):
    tok = ByteTokenizer()
    prompts = ["abcabcab", "the sea is", "x"]
    plain = generate(target, prompts, GenerationConfig(max_new_tokens=24, temperature=0.0, eos=False), tok)
    eos_id = plain[0].token_ids[6]  # a token the first row generates: it ends that row early
    text = plain[1].text
    stop = next(text[i:i + 2] for i in range(2, len(text)) if text[i:i + 2].isascii())  # in the second row
    cases = {"eos": (GenerationConfig(max_new_tokens=24, temperature=0.0), eos_id),
             "stop": (GenerationConfig(max_new_tokens=24, temperature=0.0, stop=[stop]), None),
             "length": (GenerationConfig(max_new_tokens=24, temperature=0.0, repetition_penalty=1.3), None)}
    for reason, (cfg, eos) in cases.items():
        expected = generate(target, prompts, cfg, tok, eos_id=eos)
        completions, _ = speculative_generate(target, prompts, cfg, tok, eos_id=eos, num_draft_tokens=4,
                                              **drafts[drafter])
        assert completions == expected
        assert reason in [c.finish_reason for c in completions]


@pytest.mark.parametrize("prompt_len", [BLOCK - 1, BLOCK - 2, BLOCK - 4])
def test_greedy_at_the_block_size_edge(target, drafts, prompt_len):
    prompt = [[(7 * i) % 250 for i in range(prompt_len)]]
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.0, eos=False)
    expected = generate(target, prompt, cfg)
    for drafter in ("itself", "prompt lookup"):
        completions, stats = speculative_generate(target, prompt, cfg, num_draft_tokens=5, **drafts[drafter])
        assert completions == expected and len(completions[0].token_ids) == BLOCK - prompt_len
        assert stats.new_tokens == stats.accepted + stats.target_passes


def test_counts_are_consistent(target, drafts):
    cfg = GenerationConfig(max_new_tokens=30, temperature=0.0, eos=False)
    completions, stats = speculative_generate(target, PROMPTS[:3], cfg, num_draft_tokens=3,
                                              **drafts["perturbed copy"])
    assert stats.new_tokens == sum(len(c.token_ids) for c in completions) == 3 * 30
    assert stats.new_tokens == stats.accepted + stats.target_passes  # each pass: its accepted drafts + one token
    assert stats.draft_passes == stats.drafted  # one draft pass per proposed token
    assert stats.accepted <= stats.drafted <= 3 * (stats.target_passes - 3)  # <= k per round, no round in prefill
    assert stats.tokens_per_target_pass == pytest.approx(stats.new_tokens / stats.target_passes)
    _, lookup = speculative_generate(target, PROMPTS[:3], cfg, prompt_lookup=2)
    assert lookup.draft_passes == 0 and lookup.new_tokens == lookup.accepted + lookup.target_passes


def test_prompt_lookup_proposal():
    tokens = [1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]
    assert prompt_lookup_proposal(tokens, 2, 3) == [5, 6, 2]  # the latest earlier "2 3" is followed by 5 6 2
    assert prompt_lookup_proposal(tokens, 3, 3) == [5, 6, 2]  # no earlier "6 2 3": falls back to n = 2
    assert prompt_lookup_proposal(tokens + [4], 3, 2) == [9, 2]  # "2 3 4" occurs at the start
    assert prompt_lookup_proposal([1, 2, 3, 7], 3, 4) == []
    assert prompt_lookup_proposal([5, 5, 5], 2, 4) == [5]  # overlapping match: only what precedes the end
    assert prompt_lookup_proposal([5], 2, 4) == []


def test_bad_drafts_are_one_line_errors(target, model_dir, tmp_path):
    with pytest.raises(TokenizerMismatchError, match="vocab_size 300, expected 260"):
        speculative_generate(target, [[1, 2]], GenerationConfig(), draft=tiny(3, vocab_size=300))
    with pytest.raises(ConfigError, match="exactly one drafter"):
        speculative_generate(target, [[1, 2]], GenerationConfig())
    with pytest.raises(ConfigError, match="exactly one drafter"):
        speculative_generate(target, [[1, 2]], GenerationConfig(), draft=target, prompt_lookup=2)
    with pytest.raises(ConfigError, match="num_draft_tokens=0"):
        speculative_generate(target, [[1, 2]], GenerationConfig(), draft=target, num_draft_tokens=0)
    ours, theirs = SimpleNamespace(fingerprint="a" * 64), SimpleNamespace(fingerprint="b" * 64)
    with pytest.raises(TokenizerMismatchError, match="draft model d/: its tokenizer .bbbbbbbbbbbb. is not the one "
                                                     "of target model t/ .aaaaaaaaaaaa."):
        check_draft(target, target, ours, theirs, target_dir="t/", draft_dir="d/")
    check_draft(target, target, ours, ours)

    from lmforge.convert import load_with_tokenizer
    from lmforge.tokenizer import Tokenizer

    model, tokenizer = load_with_tokenizer(model_dir)
    other_tokenizer = Tokenizer.train(["an entirely different text to learn from"] * 20, vocab_size=300)
    model.save(tmp_path)
    other_tokenizer.save(tmp_path)
    assert load_draft(model_dir, model, tokenizer, target_dir=model_dir).config == model.config
    with pytest.raises(TokenizerMismatchError) as error:
        load_draft(tmp_path, model, tokenizer, target_dir=model_dir)
    assert str(tmp_path) in str(error.value) and str(model_dir) in str(error.value)
    assert "\n" not in str(error.value)


# ---- the distribution of sampled tokens ---------------------------------------------------------------------

def chi_square_rejects(counts: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-3) -> tuple[bool, float, float]:
    """Pearson's chi-square goodness-of-fit test of `counts` against `probs` (same shape, probs summing to 1):
    (rejects at level alpha, statistic, critical value). Cells expecting fewer than 5 counts are pooled into one;
    any count in a cell of probability 0 rejects outright."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    if counts[probs == 0].sum() > 0:
        return True, float("inf"), 0.0
    expected = probs * counts.sum()
    small = expected < 5
    observed_cells = torch.cat([counts[~small], counts[small].sum()[None]])
    expected_cells = torch.cat([expected[~small], expected[small].sum()[None]])
    observed_cells, expected_cells = observed_cells[expected_cells > 0], expected_cells[expected_cells > 0]
    statistic = float(((observed_cells - expected_cells) ** 2 / expected_cells).sum())
    df = len(expected_cells) - 1
    try:
        from scipy.stats import chi2  # installed with datasketch, an lmforge dependency

        critical = float(chi2.ppf(1 - alpha, df))
    except ImportError:  # Wilson-Hilferty: within 1% of the exact quantile for df >= 3; z = 3.0902 for 1e-3
        critical = df * (1 - 2 / (9 * df) + 3.0902 * (2 / (9 * df)) ** 0.5) ** 3
    return statistic > critical, statistic, critical


def test_verify_rule_draws_from_the_target_distribution():
    """The rejection rule alone, on fixed distributions: the first token out ~ p_1 whatever q is, the second (when
    d_1 was kept) ~ p_2, with draft distributions q and with point-mass drafts (prompt lookup), p after temperature
    and top-k (so q puts weight where p has none); returning the drafts unchanged fails the same test."""
    V, N = 8, 4000
    rng = torch.Generator().manual_seed(0)
    logits = 1.5 * torch.randn(3, V, generator=rng)  # (k + 1, V): the target
    q = torch.softmax(1.5 * torch.randn(2, V, generator=rng), dim=-1)  # (k, V): a draft unlike the target
    cfg = GenerationConfig(temperature=0.7, top_k=6)
    p = torch.softmax(warp_logits(logits, cfg), dim=-1)
    assert 0.5 * (p[:2] - q).abs().sum(-1).min() > 0.3  # total variation: the draft differs clearly
    drafted = torch.multinomial(q, N, replacement=True, generator=rng).T.tolist()  # (N, k)
    point_mass = [[int(p[0].argmax()), int(q[1].argmax())]] * N  # kept often, then often rejected
    for drafts, draft_probs in [(drafted, q), (point_mass, None)]:
        first, second = torch.zeros(V), torch.zeros(V)
        for row in drafts:
            n, token = verify(logits, row, draft_probs, cfg, rng)
            out = row[:n] + [token]
            first[out[0]] += 1
            if n >= 1:
                second[out[1]] += 1
        assert not chi_square_rejects(first, p[0])[0]
        assert not chi_square_rejects(second, p[1])[0]
    unchanged = torch.bincount(torch.tensor([row[0] for row in drafted]), minlength=V)
    assert chi_square_rejects(unchanged, p[0])[0]


def exact_token_probs(model: Transformer, prompt: list[int], cfg: GenerationConfig, V: int) -> torch.Tensor:
    """P(t1, t2, t3) (V, V, V) of the first three tokens `generate` samples after `prompt` under cfg: the product
    of the processed next-token distributions, computed over all V^2 continuations in one forward pass."""
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # (V^2, 2): t1, t2
    seqs = torch.cat([torch.tensor(prompt).expand(V * V, len(prompt)), pairs], dim=1)  # (V^2, T + 2)
    with torch.no_grad():
        logits = model(seqs)[:, len(prompt) - 1:]  # (V^2, 3, V): next-token logits after T, T + 1, T + 2 tokens
    steps = []
    for step in range(3):
        present = token_presence(seqs[:, :len(prompt) + step], V)
        steps.append(torch.softmax(warp_logits(logits[:, step], cfg, present).double(), dim=-1))  # (V^2, V)
    first, second, third = (s.reshape(V, V, V) for s in steps)  # [t1, t2, next]
    return first[0, 0][:, None, None] * second[:, 0, :][:, :, None] * third  # [t1, t2, t3]


def test_sampled_tokens_follow_the_target_distribution(monkeypatch):
    """End to end with a draft model on an 8-token vocabulary: the joint distributions of (t1, t2) and (t2, t3)
    over seeded samples match the target's exact ones (t2 and t3 go through drafting and verification: k = 2 in
    the first round), under temperature and a repetition penalty; with every draft accepted unchecked the test
    fails."""
    V, N, prompt = 8, 1000, [1, 2, 3]
    small = dict(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_kv_head=1, init_std=0.5)
    target_model, draft_model = tiny(10, **small), tiny(11, **small)
    cfg = GenerationConfig(max_new_tokens=4, temperature=0.8, repetition_penalty=1.3, eos=False, seed=0)
    exact = exact_token_probs(target_model, prompt, cfg, V)
    draft_exact = exact_token_probs(draft_model, prompt, cfg, V)
    assert 0.5 * (exact.sum((0, 2)) - draft_exact.sum((0, 2))).abs().sum() > 0.3  # t2's law: clearly different

    def joint_counts(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        completions, _ = speculative_generate(target_model, [prompt] * rows, cfg, draft=draft_model,
                                              num_draft_tokens=2)
        tokens = torch.tensor([c.token_ids[:3] for c in completions])  # (N, 3)
        first_pair = torch.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V)
        second_pair = torch.bincount(tokens[:, 1] * V + tokens[:, 2], minlength=V * V)
        return first_pair, second_pair

    first_pair, second_pair = joint_counts(N)
    assert not chi_square_rejects(first_pair, exact.sum(2))[0]
    assert not chi_square_rejects(second_pair, exact.sum(0))[0]

    real_verify = speculative.verify

    def keep_every_draft(logits, drafted, draft_probs, cfg, generator, present):
        k = len(drafted)  # the drafts pass unchecked; the token after them is the target's as before
        return k, real_verify(logits[k:], [], None, cfg, generator, None if present is None else present[k:])[1]

    monkeypatch.setattr(speculative, "verify", keep_every_draft)
    first_pair, _ = joint_counts(N // 3)  # fails with a third of the samples already
    assert chi_square_rejects(first_pair, exact.sum(2))[0]


def test_sampling_is_seeded_and_prompt_lookup_samples(target, drafts):
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.9, top_p=0.9, eos=False, seed=3)
    for drafter in ("perturbed copy", "prompt lookup"):
        first, _ = speculative_generate(target, PROMPTS[:2], cfg, **drafts[drafter])
        again, _ = speculative_generate(target, PROMPTS[:2], cfg, **drafts[drafter])
        assert first == again and all(len(c.token_ids) == 20 for c in first)
