"""The engine: block pool, scheduler (no model), and requests through the paged runner against plain generate."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError, PromptTooLongError
from lmforge.infer.block_pool import BlockPool, OutOfBlocks, block_hashes
from lmforge.infer.config import GenerationConfig
from lmforge.infer.engine import Engine
from lmforge.infer.generate import generate
from lmforge.infer.scheduler import RUNNING, WAITING, Scheduler, Sequence
from lmforge.model import ModelConfig, Transformer

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0.0, eos=False)


# ---- block pool and scheduler: no model -----------------------------------------------------------------------

def test_pool_allocates_frees_and_reuses_least_recently_freed_first():
    pool = BlockPool(4, 2)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.num_free == 1 and pool.peak_used == 3
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    pool.free(a)  # freed in reverse: the sequence's last block is reused first
    assert pool.allocate(2) == [3, 2]
    with pytest.raises(RuntimeError):
        pool.free([0, 0])


def test_prefix_cache_shares_full_blocks_and_evicts_them_last():
    pool = BlockPool(6, 2)
    tokens = [5, 6, 7, 8, 9]
    hashes = block_hashes(tokens, 2)
    assert len(hashes) == 2  # two full blocks; the fifth token's block is partial
    assert block_hashes([5, 6, 7, 9], 2)[0] == hashes[0] and block_hashes([5, 6, 7, 9], 2)[1] != hashes[1]
    assert block_hashes([1, 5, 6], 2)[0] != block_hashes([5, 6], 2)[0]
    assert block_hashes(tokens, 2, salt="x") != hashes
    blocks = pool.allocate(3)
    pool.register(blocks[0], hashes[0])
    pool.register(blocks[1], hashes[1])
    assert pool.lookup(hashes) == blocks[:2] and pool.users[blocks[0]] == 2
    pool.free(blocks[:2])
    pool.free(blocks)
    assert pool.num_free == 6
    assert pool.lookup(hashes[:1]) == blocks[:1] and pool.num_free == 5  # taken back from the free list
    pool.free(blocks[:1])
    taken = pool.allocate(4)  # the uncached blocks and the partial one go first; the cached ones last
    assert blocks[0] not in taken and blocks[1] not in taken
    pool.allocate(2)  # now the cached blocks are reused: their hashes are dropped
    assert pool.lookup(hashes) == []
    pool.count_lookup(5, 3)
    assert pool.hit_rate() == pytest.approx(3 / 5)


def test_scheduler_chunks_prefills_within_the_token_budget_and_serves_running_first():
    scheduler = Scheduler(BlockPool(32, 4), max_batch_tokens=10, max_seqs=8)
    long, short = Sequence(0, list(range(17)), 17), Sequence(1, [1, 2, 3], 3)
    scheduler.add(long)
    scheduler.add(short)
    chunks = scheduler.schedule()
    assert [(c.seq.seq_id, c.start, c.length, c.sample) for c in chunks] == [(0, 0, 10, False)]
    for c in chunks:
        scheduler.computed(c)
    chunks = scheduler.schedule()  # the rest of the long prompt, then the short one admitted in what is left
    assert [(c.seq.seq_id, c.start, c.length, c.sample) for c in chunks] == [(0, 10, 7, True), (1, 0, 3, True)]
    assert len(long.block_table) == 5 and len(short.block_table) == 1


def test_scheduler_preempts_the_newest_sequence_and_it_recomputes_later():
    pool = BlockPool(4, 2)
    scheduler = Scheduler(pool, max_batch_tokens=64, max_seqs=8)
    old, new = Sequence(0, [1, 2, 3], 3), Sequence(1, [4, 5, 6], 3)
    scheduler.add(old)
    scheduler.add(new)
    for c in scheduler.schedule():
        scheduler.computed(c)
    old.tokens += [7, 8]  # two generated tokens: the next step needs a third block for `old`
    old.num_computed = 4
    chunks = scheduler.schedule()
    assert [c.seq for c in chunks] == [old] and new.status == WAITING and new.block_table == []
    assert scheduler.waiting[0] is new and scheduler.preemptions == 1 and old.status == RUNNING


def test_a_waiting_sequence_that_cannot_be_admitted_does_not_hold_blocks():
    pool = BlockPool(3, 2)
    scheduler = Scheduler(pool, max_batch_tokens=64, max_seqs=8)
    first = Sequence(0, [1, 2, 3, 4, 5], 5)
    scheduler.add(first)
    for c in scheduler.schedule():
        scheduler.computed(c)
    second = Sequence(1, [1, 2, 3, 4, 9, 9], 6)  # shares two cached blocks but needs a third that is not free
    scheduler.add(second)
    scheduler.schedule()
    assert second.status == WAITING and second.block_table == []
    assert pool.users[first.block_table[0]] == 1


# ---- the engine against plain generate ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=97, block_size=64, d_model=64, init_std=0.2)
    return Transformer(cfg).eval()


def random_prompts(n: int, seed: int, longest: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(1, longest, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone(model, prompt, cfg=GREEDY, **kwargs):
    return generate(model, [prompt], cfg, **kwargs)[0]


@pytest.mark.parametrize("block_size,num_blocks,max_batch_tokens", [(16, None, 512), (4, 30, 16), (8, 12, 7)])
def test_greedy_outputs_equal_generating_each_prompt_alone(model, block_size, num_blocks, max_batch_tokens):
    """Mixed lengths; with few blocks (preemption) and small budgets (chunked prefill) too."""
    prompts = random_prompts(10, seed=1)
    engine = Engine(model, block_size=block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
                    max_seqs=8)
    completions = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in completions] == [alone(model, p).token_ids for p in prompts]
    if num_blocks is not None:
        assert engine.stats()["preemptions"] > 0
    assert engine.pool.num_used == 0 and not engine.has_unfinished()


def test_staggered_arrivals_with_eos_and_lengths_equal_generating_alone(model):
    prompts = random_prompts(8, seed=2)
    eos = alone(model, prompts[0], GenerationConfig(max_new_tokens=6, temperature=0.0, eos=False)).token_ids[-1]
    cfgs = [GenerationConfig(max_new_tokens=4 + 3 * i, temperature=0.0) for i in range(len(prompts))]
    engine = Engine(model, block_size=8, max_seqs=4)
    ids = {}
    for step in range(200):
        if step % 3 == 0 and len(ids) < len(prompts):  # a new request every third step
            i = len(ids)
            ids[i] = engine.add_request(prompts[i], cfgs[i], eos_id=eos)
        engine.step()
        if len(ids) == len(prompts) and not engine.has_unfinished():
            break
    for i, prompt in enumerate(prompts):
        got = engine.completions(ids[i])[0]
        want = alone(model, prompt, cfgs[i], eos_id=eos)
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason)


def test_prefix_cache_hits_give_identical_output(model):
    shared = random_prompts(1, seed=3, longest=2)[0] + list(range(40))  # a 40+ token common prefix
    prompts = [shared + [5, 6], shared + [7], shared + [8, 9, 10]]
    engine = Engine(model, block_size=8, max_seqs=4)
    first = engine.generate(prompts[:1], GREEDY)
    later = engine.generate(prompts[1:], GREEDY)
    assert engine.pool.hits >= 2 * (len(shared) // 8)  # the later prompts found the shared full blocks
    assert [c.token_ids for c in first + later] == [alone(model, p).token_ids for p in prompts]
    off = Engine(model, block_size=8, max_seqs=4, prefix_caching=False)
    off.generate(prompts[:1], GREEDY)
    off.generate(prompts[1:], GREEDY)
    assert off.pool.hits == 0


def test_n_samples_share_the_prompt_blocks_and_are_reproducible(model):
    prompt = list(range(1, 21))  # 20 tokens: two full blocks of 8 and a partial one
    engine = Engine(model, block_size=8, max_seqs=8)
    rid = engine.add_request(prompt, GenerationConfig(max_new_tokens=10, temperature=1.0, seed=7), n=4)
    engine.step()  # the prefill, then the fork
    leader = engine.requests[rid].samples[0].seq
    assert [engine.pool.users[b] for b in leader.block_table[:2]] == [4, 4]
    assert len({s.seq.block_table[2] for s in engine.requests[rid].samples}) == 4  # the partial block copied
    engine.run_until_done([rid])
    samples = [c.token_ids for c in engine.completions(rid)]
    assert len(set(map(tuple, samples))) > 1
    again = Engine(model, block_size=8)
    rid = again.add_request(prompt, GenerationConfig(max_new_tokens=10, temperature=1.0, seed=7), n=4)
    again.run_until_done([rid])
    assert [c.token_ids for c in again.completions(rid)] == samples
    # sample i is seeded with seed + i; sample 0 draws what generate draws with the same seed
    assert samples[0] == alone(model, prompt, GenerationConfig(max_new_tokens=10, temperature=1.0,
                                                               seed=7)).token_ids
    greedy = Engine(model, block_size=8)
    rid = greedy.add_request(prompt, GREEDY, n=3)
    greedy.run_until_done([rid])
    assert [c.token_ids for c in greedy.completions(rid)] == [alone(model, prompt).token_ids] * 3


def test_abort_frees_blocks_and_streaming_matches_the_completion(model_dir):
    from lmforge.convert import load_with_tokenizer

    tiny, tokenizer = load_with_tokenizer(model_dir)
    tiny.eval()
    engine = Engine(tiny, tokenizer, block_size=4)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.0, eos=False, stop=["at"])
    other = engine.add_request("a dog", GenerationConfig(max_new_tokens=20, temperature=0.0, eos=False))
    deltas = engine.stream("the cat", cfg)
    pieces = []
    while True:
        try:
            pieces.append(next(deltas))
        except StopIteration as done:
            completion = done.value
            break
    want = alone(tiny, "the cat", cfg, tokenizer=tokenizer)
    assert "".join(pieces) == completion.text == want.text
    assert (completion.token_ids, completion.finish_reason) == (want.token_ids, want.finish_reason)
    assert engine.abort(other)[0].finish_reason == "abort"
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    early = engine.stream("a dog", GenerationConfig(max_new_tokens=20, temperature=0.0, eos=False))
    next(early)
    early.close()  # a client that goes away: its request is aborted
    assert engine.pool.num_used == 0 and not engine.requests


def test_bad_requests_are_one_line_errors(model):
    engine = Engine(model, block_size=8, num_blocks=4)
    with pytest.raises(PromptTooLongError, match="block_size"):
        engine.add_request(list(range(64)))
    with pytest.raises(LmforgeError, match="empty"):
        engine.add_request([])
    with pytest.raises(ConfigError, match="n=0"):
        engine.add_request([1], n=0)
    with pytest.raises(ConfigError, match="raise num_blocks"):
        engine.add_request([1, 2, 3], GenerationConfig(max_new_tokens=40))
    with pytest.raises(ConfigError, match="max_seqs"):
        Engine(model, max_seqs=0)
    engine.add_request([1], GenerationConfig(max_new_tokens=4), request_id="a")
    with pytest.raises(LmforgeError, match="already in use"):
        engine.add_request([2], GenerationConfig(max_new_tokens=4), request_id="a")


# ---- lmforge generate: the engine and the options that decode with fewer passes --------------------------------

def _rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith("[") and not line.startswith("===")]


def test_cli_generate_with_prompt_lookup_or_a_draft_prints_what_plain_decoding_prints(model_dir, tmp_path, capsys):
    import shutil

    from lmforge.cli import main

    args = ["generate", str(model_dir), "--prompt", "the cat sat", "--prompt", "a dog", "--max_new_tokens", "12",
            "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--prompt_lookup", "3"]) == 0
    captured = capsys.readouterr()
    assert _rows(captured.out) == _rows(plain) and "speculative" in captured.err
    assert main(args + ["--draft", str(model_dir), "--num_draft_tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert _rows(captured.out) == _rows(plain) and "(100%)" in captured.err  # the target as its own draft
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    from lmforge.tokenizer import Tokenizer

    Tokenizer.train(["some other text entirely"] * 20, vocab_size=300).save(other)
    assert main(args + ["--draft", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tokenizer" in err and str(other) in err
    assert main(args + ["--draft", str(other), "--prompt_lookup", "2"]) == 2
    assert "choose one of" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lora", "adapter", "prefix"])
def test_peft_models_decode_like_generate(method):
    """LoRA and bottleneck adapters run in the engine (their updates live in the base's modules); prefix tuning
    falls back to generate (engine_for gives None)."""
    import copy

    from lmforge.infer.engine import engine_for
    from lmforge.infer.speculative import speculative_generate
    from lmforge.peft.config import PeftConfig
    from lmforge.peft.model import PeftModel

    torch.manual_seed(1)
    base = Transformer(ModelConfig.preset("tiny-llama", vocab_size=97, block_size=64, d_model=64, init_std=0.2))
    peft = PeftModel(copy.deepcopy(base), PeftConfig(method=method, targets=["q", "v", "up"], virtual_tokens=4))
    with torch.no_grad():  # trained-looking updates, so the adapted model differs from its base
        for name, param in peft.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    peft.eval()
    prompts = random_prompts(4, seed=5)
    want = [alone(peft, p).token_ids for p in prompts]
    assert want != [alone(base.eval(), p).token_ids for p in prompts]
    engine = engine_for(peft)
    if method == "prefix":
        assert engine is None
        return
    assert [c.token_ids for c in engine.generate(prompts, GREEDY)] == want
    completions, _ = speculative_generate(peft, prompts, GREEDY, prompt_lookup=2)
    assert [c.token_ids for c in completions] == want


def test_n_samples_when_the_first_token_ends_them_and_when_aborted_before_the_fork(model):
    """The fork happens before the leader's token is appended: a leader that ends at once (max_new_tokens 1)
    still lends its blocks; every block comes back. Aborting before the prompt is prefilled ends all n samples."""
    for prompt in (list(range(1, 21)), list(range(1, 17))):  # a partial last block, and whole blocks only
        engine = Engine(model, block_size=8, max_seqs=2)
        rid = engine.add_request(prompt, GenerationConfig(max_new_tokens=1, temperature=1.0, seed=3), n=3)
        engine.run_until_done([rid])
        assert [len(c.token_ids) for c in engine.completions(rid)] == [1, 1, 1]
        assert engine.pool.num_used == 0 and not engine.has_unfinished()
    engine = Engine(model, block_size=8, max_batch_tokens=8)
    rid = engine.add_request(list(range(1, 30)), GenerationConfig(max_new_tokens=4), n=3)
    engine.step()  # a first chunk of the prompt only
    assert sorted(o.index for o in engine.abort(rid)) == [0, 1, 2]
    assert engine.pool.num_used == 0 and not engine.has_unfinished()


def test_forked_samples_respect_max_seqs(model):
    engine = Engine(model, block_size=8, max_seqs=2)
    rid = engine.add_request(list(range(1, 12)), GenerationConfig(max_new_tokens=6, temperature=0.0), n=4)
    while engine.has_unfinished():
        engine.step()
        assert len(engine.scheduler.running) <= 2
    assert [c.token_ids for c in engine.completions(rid)] == [alone(model, list(range(1, 12)),
                                                                    GenerationConfig(max_new_tokens=6,
                                                                                     temperature=0.0)).token_ids] * 4


def test_prompt_and_token_logprobs_equal_a_plain_forward_pass(model):
    """Prompt log-probabilities over chunked prefill (budget 8) and the generated tokens' own and top-k ones."""
    prompt = random_prompts(1, seed=9, longest=2)[0] + list(range(3, 30))
    engine = Engine(model, block_size=8, max_batch_tokens=8)
    engine.generate([prompt], GREEDY)  # its blocks are in the prefix cache: a scored prompt must not use them
    rid = engine.add_request(prompt, GenerationConfig(max_new_tokens=5, temperature=0.0, eos=False),
                             logprobs=3, prompt_logprobs=2)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == rid]
    request = engine.requests[rid]
    generated = request.samples[0].generated
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + generated]))[0], dim=-1)  # (T, V)
    full = prompt + generated
    want = [float(logp[p - 1, full[p]]) for p in range(1, len(full))]
    got = [s.logprob for s in request.prompt_scores] + [s.logprob for o in outputs for s in o.logprobs]
    assert got == pytest.approx(want, abs=1e-4)
    first = request.prompt_scores[0]
    top = logp[0].topk(2)
    assert list(first.top) == top.indices.tolist() and list(first.top.values()) == pytest.approx(top.values.tolist(),
                                                                                                  abs=1e-4)
    assert all(len(o.logprobs[0].top) == 3 and o.logprobs[0].token == o.token_ids[0] for o in outputs)
    # greedy: the chosen token is the most likely one
    assert all(max(o.logprobs[0].top.values()) == pytest.approx(o.logprobs[0].logprob) for o in outputs)
