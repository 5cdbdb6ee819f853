"""Medusa: the heads and their files, the loss, the training stage, the tree, and tree decoding (greedy identity with
`generate`, typical acceptance) on tiny models."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError, LmforgeError, TokenizerMismatchError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.generate import generate
from lmforge.infer.medusa import DEFAULT_TREE, _accepted, build_tree, make_tree, medusa_generate
from lmforge.model import ModelConfig, Transformer
from lmforge.model.medusa import MedusaHeads, MedusaModel, load_medusa_heads
from lmforge.objectives.medusa import head_targets, medusa_loss
from lmforge.stages.config import MedusaConfig
from lmforge.stages.medusa import distill_batch, medusa_train
from lmforge.data.shards import TokenShards
from lmforge.tokenizer import Tokenizer
from lmforge.train.data import validation_batches

REPO = Path(__file__).resolve().parents[1]
VOCAB, BLOCK = 64, 48
TREE = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (1, 0, 0)]


@pytest.fixture(scope="module")
def lm() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny-llama", vocab_size=VOCAB, block_size=BLOCK, d_model=32)).eval()


# ---- the loss ------------------------------------------------------------------------------------------------------

def test_head_targets_shift_by_k():
    targets = torch.tensor([[1, 2, 3, 4]])  # the token after each input position
    assert head_targets(targets, 1).tolist() == [[2, 3, 4, -100]]  # head 1 at t: token t + 2
    assert head_targets(targets, 2).tolist() == [[3, 4, -100, -100]]


def test_loss_on_worked_numbers():
    # K = 2 heads, one row of 3 positions, vocabulary 3; targets y = [0, 2, 1] (y_t = token t + 1)
    logits = torch.tensor([[[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]],   # head 1
                           [[[0.0, 0.0, 3.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]]])  # head 2
    targets = torch.tensor([[0, 2, 1]])
    # head 1 targets [2, 1, -]: -log softmax([2,0,0])[2] and -log softmax([0,1,0])[1]
    ce1 = ((math.log(math.exp(2) + 2) - 0.0) + (math.log(2 + math.e) - 1.0)) / 2
    ce2 = math.log(math.exp(3) + 2) - 0.0  # head 2: one target, y_2 = 1 at t = 0: logit 0
    loss, metrics = medusa_loss(logits, targets, decay=0.5)
    assert loss.item() == pytest.approx(ce1 + 0.5 * ce2, rel=1e-6)
    assert metrics["head1_loss"].item() == pytest.approx(ce1, rel=1e-6)
    assert metrics["head2_loss"].item() == pytest.approx(ce2, rel=1e-6)
    assert metrics["head1_top1"].item() == pytest.approx(0.5)  # argmax 0 (target 2: miss), argmax 1 (target 1: hit)
    assert metrics["head2_top1"].item() == 0.0 and metrics["head2_top5"].item() == 1.0
    assert metrics["tokens"].item() == 2


# ---- heads and their files -----------------------------------------------------------------------------------------

def test_heads_start_as_the_base_head(lm):
    heads = MedusaHeads.for_base(lm, num_heads=3, num_layers=2)
    hidden = torch.randn(2, 5, 32)
    logits = heads(hidden)
    assert logits.shape == (3, 2, 5, VOCAB)
    for k in range(3):
        torch.testing.assert_close(logits[k], lm.lm_head(hidden))
    MedusaModel(lm, heads).train()
    assert not lm.training and all(not p.requires_grad for p in lm.parameters())
    assert all(p.requires_grad for p in heads.parameters())


def test_save_load_round_trip_and_another_base_is_refused(lm, tmp_path):
    heads = MedusaHeads.for_base(lm, num_heads=2, base_name="models/base")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.01 * torch.randn_like(p))
    heads.save(tmp_path / "heads")
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert (config["num_heads"], config["num_layers"], config["base_model"]) == (2, 1, "models/base")
    assert config["base_config"]["vocab_size"] == VOCAB and len(config["base_fingerprint"]) == 64
    loaded = load_medusa_heads(tmp_path / "heads", lm)
    hidden = torch.randn(3, 32)
    torch.testing.assert_close(loaded(hidden), heads(hidden))
    torch.manual_seed(1)
    other = Transformer(lm.config)
    with pytest.raises(LmforgeError, match=r"trained for base model models/base .* not for models/other"):
        load_medusa_heads(tmp_path / "heads", other, base_name="models/other")
    with pytest.raises(LmforgeError, match="not a Medusa heads dir"):
        load_medusa_heads(tmp_path, lm)


# ---- the stage -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def medusa_base(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model dir with a tokenizer, and a dataset dir in that tokenizer of counting runs (token t + 2 follows
    from token t: learnable by head 1 on a random trunk)."""
    root = tmp_path_factory.mktemp("medusa")
    tokenizer = Tokenizer.train(["the cat sat on the mat", "a dog is a friend"] * 20, vocab_size=300)
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=tokenizer.vocab_size, block_size=32, d_model=32,
                                   n_layer=1)).save(root / "model")
    tokenizer.save(root / "model")
    data = root / "data"
    (data / "tokenizer").mkdir(parents=True)
    tokenizer.save(data / "tokenizer")
    rng = np.random.default_rng(0)
    eos, splits = tokenizer.eos_id, {}
    for split, docs in (("train", 300), ("val", 20)):
        tokens = []
        for _ in range(docs):
            start = int(rng.integers(10, 200))
            tokens += list(range(start, start + int(rng.integers(10, 40)))) + [eos]
        np.array(tokens, dtype=np.uint16).tofile(data / f"{split}_000000.bin")
        splits[split] = {"shards": [f"{split}_000000.bin"], "tokens": len(tokens), "documents": docs,
                         "bytes": 3 * len(tokens)}
    meta = {"format": "lmforge-dataset-v1", "dtype": "uint16", "vocab_size": tokenizer.vocab_size, "eos_id": eos,
            "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_dir": str(data / "tokenizer"),
            "splits": splits}
    (data / "meta.json").write_text(json.dumps(meta))
    return root / "model", data


def train_config(model: Path, data: Path, out: Path, **train) -> MedusaConfig:
    from lmforge.config import build_config

    settings = {"batch_size": 8, "max_steps": 40, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "eval_interval": 0,
                "eval_batches": 2, "checkpoint_interval": 0, "log_interval": 10, "device": "cpu", **train}
    return build_config(MedusaConfig, {"model": str(model), "num_heads": 2, "data": {"dataset": str(data)},
                                       "train": settings, "out_dir": str(out)})


def test_training_raises_head_accuracy_and_writes_a_heads_dir(medusa_base, tmp_path):
    model_dir, data = medusa_base
    run = medusa_train(train_config(model_dir, data, tmp_path / "run"))
    summary = json.loads((run / "summary.json").read_text())
    base = Transformer.from_dir(model_dir).eval()
    heads = load_medusa_heads(run / "final", base)
    assert heads.num_heads == 2 and (run / "final" / "tokenizer.json").is_file()
    # untrained heads predict the base head's next token; head 1 must learn the token after it
    batch = validation_batches(TokenShards(data, "val"), 32, 8, 1, 0, 1, torch.device("cpu"))[0]
    _, before = medusa_loss(MedusaModel(base, MedusaHeads.for_base(base, 2))(batch["input_ids"]), batch["targets"])
    assert before["head1_top1"] < 0.2
    assert summary["val_head1_top1"] > 0.6 and summary["val_head1_top5"] >= summary["val_head1_top1"]
    assert {"val_head2_top1", "val_head2_top5", "val_head2_loss"} <= set(summary)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_head1_top5" in r for r in records if r["kind"] == "val")


def test_resume_continues_from_the_heads_checkpoint(medusa_base, tmp_path):
    model_dir, data = medusa_base
    medusa_train(train_config(model_dir, data, tmp_path / "run", max_steps=4, checkpoint_interval=2))
    resumed = dataclasses.replace(train_config(model_dir, data, tmp_path / "run", max_steps=6, checkpoint_interval=2),
                                  resume=True)
    run = medusa_train(resumed)
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
    assert (run / "checkpoints" / "step_6" / "medusa_heads.safetensors").is_file()


def test_dataset_of_another_tokenizer_is_refused(medusa_base, model_dir, tmp_path):
    _, data = medusa_base
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        medusa_train(train_config(model_dir, data, tmp_path / "run"))


def test_self_distillation_rows_train_on_generated_tokens_only(lm):
    from lmforge.stages.config import MedusaDataSection

    prompts = [[5, 6, 7], [8, 9, 10]]
    batch = distill_batch(lm, prompts, MedusaDataSection(new_tokens=5), 12, None, 0, torch.device("cpu"))
    completions = generate(lm, prompts, GenerationConfig(max_new_tokens=5, temperature=0, eos=False))
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens = prompt + completion.token_ids
        assert batch["input_ids"][row, :7].tolist() == tokens[:-1]
        assert batch["targets"][row, :7].tolist() == [-100, -100] + completion.token_ids
        assert batch["targets"][row, 7:].eq(-100).all()


@pytest.mark.slow
def test_cli_medusa_train_self_distill_end_to_end(medusa_base, tmp_path):
    model_dir, data = medusa_base
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "lmforge", "medusa", "train", str(model_dir), "--data.dataset", str(data),
         "--data.self_distill", "true", "--data.prompt_len", "8", "--data.new_tokens", "12", "--out_dir", str(out),
         "--train.max_steps", "3", "--train.batch_size", "4", "--train.eval_batches", "1", "--train.device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final" / "config.json").is_file() and (out / "final" / "medusa_heads.safetensors").is_file()
    assert "val_head2_top1" in json.loads((out / "summary.json").read_text())


# ---- the tree ------------------------------------------------------------------------------------------------------

def test_tree_mask_depths_and_parents_by_hand():
    tree = make_tree([(1,), (0,), (0, 0)])  # sorted: node 1 = (0,), node 2 = (1,), node 3 = (0, 0)
    assert tree.paths == ((0,), (1,), (0, 0))
    assert tree.depth.tolist() == [0, 1, 1, 2] and tree.parent.tolist() == [0, 0, 0, 1]
    assert tree.mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert tree.ancestors.tolist() == [[0, 0, 0], [0, 1, 1], [0, 2, 2], [0, 1, 3]]
    assert tree.internal.tolist() == [0, 1] and (tree.head.tolist(), tree.rank.tolist()) == ([0, 0, 1], [0, 1, 0])
    assert len(build_tree(DEFAULT_TREE, 4, 128).paths) == 32
    for n in range(1, 33):  # every prefix of the default tree is a tree
        build_tree(DEFAULT_TREE[:n], 4, 128)


@pytest.mark.parametrize("paths, message", [
    ([(0, 0)], "lacks its prefix"), ([(0,), (0, 0), (0, 0, 0)], "3 deep but the heads are only 2"),
    ([], "no paths"), ([(0,), (0,)], "twice"), ([(-1,)], "ranks >= 0"),
    ([(i,) for i in range(BLOCK)], "do not fit the model's context")])
def test_bad_trees_are_one_line_errors(paths, message):
    with pytest.raises(ConfigError, match=message):
        build_tree(paths, 2, BLOCK)


def test_tree_step_sees_prefix_and_ancestors_at_prefix_plus_depth(lm):
    calls = []
    real = lm.hidden_states

    def spy(ids, position_ids=None, attention_mask=None, kv_cache=None):
        calls.append((ids.shape, position_ids, attention_mask, kv_cache.length))
        return real(ids, position_ids=position_ids, attention_mask=attention_mask, kv_cache=kv_cache)

    lm.hidden_states = spy
    try:
        medusa_generate(lm, MedusaHeads.for_base(lm, 2), [[1, 2, 3], [4, 5, 6, 7, 8]],
                        GenerationConfig(max_new_tokens=4, temperature=0), tree=[(0,), (1,), (0, 0)])
    finally:
        del lm.hidden_states
    shape, positions, mask, past = calls[1]  # the first tree step after the prefill
    assert past == 5 and shape == (2, 4)
    assert positions.tolist() == [[3, 4, 4, 5], [5, 6, 6, 7]]  # each row's length + depth
    assert mask.shape == (2, 1, 4, 9)
    assert mask[0, 0, :, :5].tolist() == [[True] * 3 + [False] * 2] * 4  # row 0's padding is hidden
    assert mask[1, 0, :, :5].all()
    tree = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert mask[0, 0, :, 5:].int().tolist() == tree and mask[1, 0, :, 5:].int().tolist() == tree


# ---- decoding ------------------------------------------------------------------------------------------------------

class OracleHeads(nn.Module):
    """Heads that know the greedy continuation of given sequences: at a hidden state met in a sequence they put the
    true token k + 1 places ahead at rank 0, at rank 1 (behind a decoy), or out of reach, by a fixed pattern, so rows
    accept paths of different lengths through different branches."""

    def __init__(self, lm: Transformer, sequences: list[list[int]], num_heads: int = 3) -> None:
        super().__init__()
        self.num_heads = num_heads
        keys, answers = [], []
        with torch.no_grad():
            for seq in sequences:
                keys.append(lm.hidden_states(torch.tensor([seq]))[0])
                answers += [[seq[t + k + 1] if t + k + 1 < len(seq) else -1 for k in range(1, num_heads + 1)]
                            for t in range(len(seq))]
        self.keys, self.answers = torch.cat(keys), torch.tensor(answers)

    def forward(self, hidden: torch.Tensor, count: int = 3) -> torch.Tensor:
        logits = torch.zeros(self.num_heads, hidden.shape[0], VOCAB)
        distance, index = torch.cdist(hidden, self.keys).min(dim=1)
        for row in range(hidden.shape[0]):
            if distance[row] > 1e-3:
                continue
            for k in range(self.num_heads):
                answer, mode = int(self.answers[index[row], k]), (int(index[row]) * 7 + k) % 4
                if answer < 0:
                    continue
                logits[k, row, (answer + 1) % VOCAB] = 3.0  # a decoy
                logits[k, row, answer] = {0: 4.0, 1: 2.0, 2: 4.0, 3: -5.0}[mode]  # rank 0, 1, 0, out of reach
        return logits[:count]


PROMPTS = [[3, 9, 27, 17], [5, 1], [60, 2, 33, 41, 7, 7, 12], [11] * 30]


@pytest.fixture(scope="module")
def oracle(lm) -> OracleHeads:
    singles = [generate(lm, [p], GenerationConfig(max_new_tokens=BLOCK, temperature=0, eos=False))[0]
               for p in PROMPTS]
    return OracleHeads(lm, [p + c.token_ids for p, c in zip(PROMPTS, singles)])


def assert_same(lm, heads, prompts, cfg, **kwargs):
    expected = generate(lm, prompts, cfg, **kwargs)
    got, stats = medusa_generate(lm, heads, prompts, cfg, tree=TREE, **kwargs)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in expected]
    assert stats.tokens == sum(len(c.token_ids) for c in expected)
    return stats


def test_greedy_is_generate_at_batch_1(lm, oracle):
    for prompt in PROMPTS[:3]:
        stats = assert_same(lm, oracle, [prompt], GenerationConfig(max_new_tokens=20, temperature=0))
        assert stats.mean_accepted_length > 1.3  # the oracle's right guesses were taken
    stats = assert_same(lm, oracle, [PROMPTS[3]], GenerationConfig(max_new_tokens=40, temperature=0))  # near the end
    assert stats.tokens == BLOCK - 30


def test_greedy_is_generate_at_batch_3_with_eos_and_different_acceptance(lm, oracle):
    cfg = GenerationConfig(max_new_tokens=16, temperature=0)
    stats = assert_same(lm, oracle, PROMPTS[:3], cfg)
    assert 0 < stats.head_acceptance[0] < 1 and stats.head_accepted[2] > 0  # short and deep paths both taken
    plain = generate(lm, PROMPTS[:3], cfg)
    eos = plain[1].token_ids[5]  # ends row 1 early (and any other row that meets it)
    ended = assert_same(lm, oracle, PROMPTS[:3], cfg, eos_id=eos)
    assert ended.tokens < stats.tokens
    assert_same(lm, oracle, PROMPTS, GenerationConfig(max_new_tokens=30, temperature=0))  # clamped by block_size


def test_typical_acceptance_rule_on_worked_numbers():
    tree = make_tree([(0,), (1,), (0, 0)])
    tokens = torch.tensor([[0, 0, 2, 1]])  # root, node (0,) = 0, node (1,) = 2, node (0, 0) = 1
    root_p, node_p = torch.tensor([0.7, 0.25, 0.05]), torch.tensor([0.34, 0.33, 0.33])
    logits = torch.stack([root_p.log(), node_p.log()])[None]  # (1, M = 2 internal nodes, V = 3)
    cfg = GenerationConfig(temperature=1.0)
    # root: H = 0.7 ln(1/.7) + ...; threshold = min(0.09, 0.3 exp(-H)) = 0.09: 0 (p .7) in, 2 (p .05) out;
    # node (0,): near-uniform, 0.3 exp(-1.0985) = 0.1 > 0.09, so threshold 0.09: token 1 (p .33) in
    ok, score = _accepted(tree, tokens, logits, cfg, threshold=0.09, alpha=0.3)
    assert ok.tolist() == [[True, True, False, True]]
    assert score[0, 3].item() == pytest.approx(math.log(0.7) + math.log(0.33), rel=1e-5)
    ok, _ = _accepted(tree, tokens, logits, cfg, threshold=0.09, alpha=0.01)  # 0.01 exp(-H) < .05: all in
    assert ok.all()


def test_typical_threshold_zero_accepts_every_proposal_and_one_that_accepts_nothing_is_sampling(lm):
    heads = MedusaHeads.for_base(lm, 3)
    cfg = GenerationConfig(max_new_tokens=24, temperature=0.8, seed=3)
    out, stats = medusa_generate(lm, heads, [[1, 2, 3], [4, 5]], cfg, tree=TREE, posterior_threshold=0.0)
    assert stats.head_acceptance == [1.0, 1.0, 1.0] and all(len(c.token_ids) == 24 for c in out)
    assert stats.mean_accepted_length > 3.5  # 4 tokens a step but the last, which the budget cuts
    out, stats = medusa_generate(lm, heads, [[1, 2, 3]], cfg, tree=TREE, posterior_threshold=1.0,
                                 posterior_alpha=1e9)  # threshold min(1, 1e9 exp(-H)) = 1: no p exceeds it
    assert stats.mean_accepted_length == 1.0 and stats.head_accepted == [0, 0, 0]
    assert out[0].token_ids == generate(lm, [[1, 2, 3]], cfg)[0].token_ids  # the same draws as plain sampling


def test_unsupported_settings_are_errors(lm):
    heads = MedusaHeads.for_base(lm, 2)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        medusa_generate(lm, heads, [[1, 2]], GenerationConfig(repetition_penalty=1.2))
    with pytest.raises(ConfigError, match="3 deep"):
        medusa_generate(lm, heads, [[1, 2]], GenerationConfig(), tree=[(0,), (0, 0), (0, 0, 0)])
