"""Pretraining: schedules, weight decay, data sampling, checkpoints, and runs (exact resume, accumulation)."""

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import build_config
from lmforge.errors import ConfigError, DataError, LmforgeError, TokenizerMismatchError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.data.shards import TokenShards
from lmforge.train.data import WindowSampler, validation_batches
from lmforge.train.metrics import MetricsLog
from lmforge.train.mfu import mfu, peak_flops
from lmforge.train.optim import build_optimizer, lr_at, param_groups
from lmforge.stages.pretrain import PretrainConfig, bits_per_byte, pretrain

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
CPU = torch.device("cpu")
TINY_MODEL = dict(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, d_model=16, d_ff=32)

torch.set_num_threads(1)  # runs in this process and in subprocesses must use the same kernels to match bit for bit


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    """The dataset's tokenizer dir only has to exist and match meta.json's fingerprint (ids are synthetic)."""
    return Tokenizer.train(["the cat sat on the mat", "a dog is a friend"] * 10, vocab_size=300)


def write_dataset(root: Path, dtype: str = "uint16", vocab_size: int = VOCAB) -> Path:
    """A dataset dir per the contract: documents are arithmetic runs mod eos (learnable), each ended by eos;
    every split is cut into two shards so reads cross a shard boundary."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = root / "tokenizer"
    tokenizer = small_tokenizer()
    tokenizer_dir.mkdir()
    tokenizer.save(tokenizer_dir)
    rng = np.random.default_rng(0)
    eos = vocab_size - 1
    docs = []
    for _ in range(60):
        start, stride, length = rng.integers(0, eos), rng.integers(1, 4), rng.integers(8, 40)
        docs.append([int((start + stride * i) % eos) for i in range(length)] + [eos])
    splits = {}
    for name, part in (("train", docs[:-8]), ("val", docs[-8:])):
        tokens = np.array([t for doc in part for t in doc], dtype=dtype)
        shards = [f"{name}_000000.bin", f"{name}_000001.bin"]
        tokens[: len(tokens) // 2].tofile(root / shards[0])
        tokens[len(tokens) // 2:].tofile(root / shards[1])
        splits[name] = {"shards": shards, "tokens": len(tokens), "documents": len(part), "bytes": 3 * len(tokens)}
    meta = {"format": "lmforge-dataset-v1", "dtype": dtype, "vocab_size": vocab_size, "eos_id": eos,
            "tokenizer_fingerprint": tokenizer.fingerprint, "tokenizer_dir": str(tokenizer_dir), "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "ds")


def config_dict(dataset: Path, out_dir: Path, **train) -> dict:
    # device cpu: these runs compare losses bit for bit or to 1e-6, which holds for fp32 CPU kernels; on a GPU,
    # auto would mean bf16 autocast and TF32 (tests/test_gpu.py covers that path)
    train = {"device": "cpu", "batch_size": 4, "max_steps": 6, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
             "eval_interval": 3, "eval_batches": 2, "checkpoint_interval": 3, "keep_checkpoints": 0, "log_interval": 1, **train}
    return {"model": TINY_MODEL, "data": {"dataset": str(dataset)}, "train": train, "out_dir": str(out_dir)}


def run(dataset: Path, out_dir: Path, resume: bool = False, **train) -> Path:
    return pretrain(build_config(PretrainConfig, {**config_dict(dataset, out_dir, **train), "resume": resume}))


def weights(run_dir: Path, name: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / name / "model.safetensors"))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["kind"] == "train"}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if atol == 0 else torch.allclose(a[key], b[key], atol=atol, rtol=0), key


# ---- schedules, optimizer groups, MFU -------------------------------------------------------------------------

def test_cosine_schedule_worked_numbers():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # 1e-3 * 1/10
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5.5e-4)  # halfway: 1e-4 + 9e-4 * (1 + cos(pi/2)) / 2
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)


def test_wsd_and_constant_schedules_worked_numbers():
    wsd = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=0, max_steps=100, schedule="wsd", decay_frac=0.2)
    assert lr_at(0, wsd) == pytest.approx(1e-3)
    assert lr_at(79, wsd) == pytest.approx(1e-3)
    assert lr_at(80, wsd) == pytest.approx(1e-3)  # decay starts at 100 - 20
    assert lr_at(90, wsd) == pytest.approx(5.5e-4)  # 1e-3 - 9e-4 * 10/20
    assert lr_at(100, wsd) == pytest.approx(1e-4)
    constant = TrainConfig(lr=3e-4, warmup_steps=4, max_steps=100, schedule="constant")
    assert [lr_at(s, constant) for s in (0, 3, 50, 99)] == pytest.approx([0.75e-4, 3e-4, 3e-4, 3e-4])


@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_groups(tie):
    model = Transformer(ModelConfig(**{**TINY_MODEL, "positions": "learned", "norm": "layernorm", "bias": True,
                                       "tie_embeddings": tie}))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(name.endswith("weight") and "norm" not in name and "emb" not in name for name in decayed)
    assert ("lm_head.weight" in decayed) is not tie  # a tied head is the embedding table
    assert {"tok_emb.weight", "pos_emb.weight"} <= {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("device_type", ["cpu", "other"])  # fused on the CPU, foreach on other devices
def test_adamw_updates_exactly_like_torchs_and_feeds_its_kernel_contiguous_views(device_type, monkeypatch):
    tc = TrainConfig(lr=1e-2, weight_decay=0.1)
    models = [Transformer(ModelConfig(**TINY_MODEL)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    assert not models[0].blocks[0].mlp.up.weight.is_contiguous()  # the (in, out) layout of a widening weight
    ours = build_optimizer(models[0], tc, device_type)
    fused = device_type == "cpu"
    reference = torch.optim.AdamW(param_groups(models[1], tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                  fused=fused, foreach=None if fused else True)
    calls, stepping = [], [None]  # (optimizer, is_contiguous() of each tensor its fused kernel got)
    real = torch._fused_adamw_

    def spy(*args, **kwargs):
        calls.append((stepping[0], [t.is_contiguous() for tensors in args[:4] for t in tensors]))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    ids = torch.randint(0, VOCAB, (2, 9))
    for _ in range(3):
        for model, optimizer in zip(models, (ours, reference)):
            torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            stepping[0] = optimizer
            optimizer.step()
            optimizer.zero_grad()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b) and a.stride() == b.stride(), name
    state = ours.state[models[0].blocks[0].mlp.up.weight]
    assert state["exp_avg"].stride() == models[0].blocks[0].mlp.up.weight.stride()
    flags = {o: [f for caller, fs in calls if caller is o for f in fs] for o in (ours, reference)}
    if fused:  # every tensor reached torch's kernel contiguous; torch's own AdamW passes the strided ones
        assert flags[ours] and all(flags[ours]) and not all(flags[reference])
    else:
        assert not calls


def test_mfu_and_peak_flops():
    assert mfu(flops_per_token=6e6, tokens_per_s=1e3, peak=1e10) == pytest.approx(0.6)
    assert peak_flops(CPU, torch.float32, override=123.0) == 123.0
    assert peak_flops(CPU, torch.float32) > 1e8  # measured


def test_bits_per_byte():
    # 2 nats/token, 100 tokens over 300 bytes: 2 * 100 / 300 / ln 2 bits per byte
    assert bits_per_byte(2.0, {"tokens": 100, "bytes": 300}) == pytest.approx(2 / 3 / math.log(2))
    assert bits_per_byte(2.0, {"tokens": 0, "bytes": 0}) is None


# ---- data -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_shards_read_across_shard_boundary(tmp_path, dtype):
    root = write_dataset(tmp_path / "ds", dtype=dtype)
    shards = TokenShards(root, "train")
    everything = np.concatenate([np.fromfile(root / name, dtype=dtype) for name in ("train_000000.bin",
                                                                                   "train_000001.bin")])
    assert len(shards) == len(everything)
    boundary = len(np.fromfile(root / "train_000000.bin", dtype=dtype))
    assert np.array_equal(shards.read(boundary - 5, 11), everything[boundary - 5: boundary + 6])
    assert shards.read(0, 3).dtype == np.int64
    with pytest.raises(IndexError):
        shards.read(len(shards) - 2, 3)


def test_sampler_epochs_ranks_and_resume(dataset):
    tokens = TokenShards(dataset, "train")
    sampler = WindowSampler(tokens, seq_len=8, seed=3)
    n = sampler.num_windows
    assert n == (len(tokens) - 1) // 8
    epoch = sorted(sampler.window(k) for k in range(n))
    assert epoch == list(range(n))  # each window once per epoch
    assert [sampler.window(k) for k in range(n, 2 * n)] != [sampler.window(k) for k in range(n)]

    whole = WindowSampler(tokens, 8, seed=3).next_batch(6, rank=0, world=1, device=CPU)
    halves = [WindowSampler(tokens, 8, seed=3).next_batch(6, rank=r, world=2, device=CPU) for r in (0, 1)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]), whole["input_ids"])
    assert torch.equal(whole["input_ids"][:, 1:], whole["targets"][:, :-1])

    first = WindowSampler(tokens, 8, seed=3)
    for _ in range(n // 4 + 1):  # cross into the second epoch
        first.next_batch(4, 0, 1, CPU)
    state = first.state_dict()
    assert state["epoch"] == 1
    second = WindowSampler(tokens, 8, seed=0)
    second.load_state_dict(state)
    assert torch.equal(first.next_batch(4, 0, 1, CPU)["input_ids"], second.next_batch(4, 0, 1, CPU)["input_ids"])
    with pytest.raises(DataError, match="windows"):
        WindowSampler(tokens, 9, seed=3).load_state_dict(state)


def test_validation_batches_are_fixed_and_split_over_ranks(dataset):
    tokens = TokenShards(dataset, "val")
    single = validation_batches(tokens, 8, batch_size=4, max_batches=2, rank=0, world=1, device=CPU)
    assert [b["input_ids"].shape for b in single] == [(4, 8), (4, 8)]
    shares = [validation_batches(tokens, 8, 4, 2, rank=r, world=2, device=CPU) for r in (0, 1)]
    rows = torch.cat([torch.cat([shares[0][i]["input_ids"], shares[1][i]["input_ids"]]) for i in range(2)])
    assert torch.equal(rows, torch.cat([b["input_ids"] for b in single]))


# ---- checkpoints and metrics ------------------------------------------------------------------------------

def test_latest_checkpoint_ignores_incomplete_dirs(tmp_path):
    for step, complete in ((3, True), (10, True), (12, False)):
        path = tmp_path / "checkpoints" / f"step_{step}"
        path.mkdir(parents=True)
        if complete:
            (path / "config.json").write_text("{}")
            (path / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / ".step_14.tmp-1").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_10"]
    assert latest_checkpoint(tmp_path).name == "step_10"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_metrics_truncate_after(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step})
    log.truncate_after(3)
    assert [r["step"] for r in log.read()] == [1, 2, 3]


# ---- pretrain: validation and runs --------------------------------------------------------------------------

def test_pretrain_rejects_bad_inputs(dataset, tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing"))):
        run(tmp_path / "missing", tmp_path / "a")
    bad_vocab = build_config(PretrainConfig, {**config_dict(dataset, tmp_path / "b"),
                                              "model": {**TINY_MODEL, "vocab_size": 32}})
    with pytest.raises(TokenizerMismatchError, match="64.*32"):
        pretrain(bad_vocab)
    long = build_config(PretrainConfig, {**config_dict(dataset, tmp_path / "c"), "data": {
        "dataset": str(dataset), "seq_len": 17}})
    with pytest.raises(ConfigError, match="seq_len"):
        pretrain(long)
    with pytest.raises(LmforgeError, match="no checkpoint"):
        run(dataset, tmp_path / "d", resume=True)


@pytest.mark.parametrize("key", ["log_interval", "eval_interval", "checkpoint_interval", "keep_checkpoints"])
def test_pretrain_rejects_negative_intervals(dataset, tmp_path, key):
    with pytest.raises(ConfigError, match=rf"^train\.{key} must be >= 0 \(0 = only at the end\), got -1$"):
        run(dataset, tmp_path / "neg", **{key: -1})


def test_log_interval_zero_logs_only_at_the_end(dataset, tmp_path):
    run_dir = run(dataset, tmp_path / "quiet", log_interval=0, max_steps=4, checkpoint_interval=0)
    assert list(train_losses(run_dir)) == [4]


def test_tokenizer_comes_from_the_dataset_dir_even_when_moved(dataset, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    (moved / "meta.json").write_text(json.dumps({**json.loads((moved / "meta.json").read_text()),
                                                 "tokenizer_dir": str(tmp_path / "gone")}))
    run_dir = run(moved, tmp_path / "run", max_steps=2, checkpoint_interval=1)
    for model_dir in (run_dir / "final", run_dir / "checkpoints" / "step_2"):
        assert Tokenizer.load(model_dir).fingerprint == small_tokenizer().fingerprint


def test_stale_or_missing_dataset_tokenizer_is_an_error(dataset, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(dataset, stale)
    (stale / "meta.json").write_text(json.dumps({**json.loads((stale / "meta.json").read_text()),
                                                 "tokenizer_fingerprint": "0" * 64}))
    with pytest.raises(TokenizerMismatchError, match="re-run `lmforge data prepare`"):
        run(stale, tmp_path / "a", max_steps=1)
    assert not (tmp_path / "a").exists()
    shutil.rmtree(stale / "tokenizer")
    with pytest.raises(DataError, match=re.escape(str(stale / "tokenizer")) + " not found"):
        run(stale, tmp_path / "b", max_steps=1)


def test_init_from_a_hugging_face_dir(dataset, tmp_path):
    from lmforge.model.hf import to_hf_dir

    torch.manual_seed(0)
    source = Transformer(ModelConfig(**TINY_MODEL))
    hf_dir = to_hf_dir(source, tmp_path / "hf")
    config = {**config_dict(dataset, tmp_path / "run", max_steps=1, lr=0.0, min_lr=0.0, checkpoint_interval=0),
              "init_from": str(hf_dir)}
    run_dir = pretrain(build_config(PretrainConfig, config))
    final = Transformer.from_dir(run_dir / "final")
    assert final.config.vocab_size == VOCAB and final.config.d_model == TINY_MODEL["d_model"]
    assert_same_weights(final.state_dict(), source.state_dict())  # lr 0: the imported weights, unchanged


def test_pretrain_lowers_loss_and_writes_run_dir(dataset, tmp_path):
    run_dir = run(dataset, tmp_path / "run", max_steps=40, eval_interval=20, checkpoint_interval=10,
                  keep_checkpoints=2, log_interval=5)
    records = MetricsLog(run_dir / "metrics.jsonl").read()
    val = [r for r in records if r["kind"] == "val"]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    assert val[-1]["val_loss"] < math.log(VOCAB) - 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["tokens_seen"] == 40 * 4 * 16
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / 3 / math.log(2))
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_30", "step_40"]
    for model_dir in (run_dir / "final", run_dir / "checkpoints" / "step_40"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "lmforge_tokenizer.json"} <= {
            p.name for p in model_dir.iterdir()}
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "config.json").read_text())["data"]["seq_len"] == 16
    assert Transformer.from_dir(run_dir / "final").config.vocab_size == VOCAB
    with pytest.raises(LmforgeError, match="already holds checkpoints"):
        run(dataset, run_dir)


def test_grad_accumulation_matches_larger_batch(dataset, tmp_path):
    accumulated = run(dataset, tmp_path / "acc", batch_size=2, grad_accum=2, max_steps=4)
    single = run(dataset, tmp_path / "one", batch_size=4, grad_accum=1, max_steps=4)
    assert train_losses(accumulated) == pytest.approx(train_losses(single), abs=1e-6)
    assert_same_weights(weights(accumulated), weights(single), atol=1e-6)


def test_activation_checkpointing_trains_the_same_model(dataset, tmp_path):
    checkpointed = run(dataset, tmp_path / "ckpt", activation_checkpointing=True, max_steps=3)
    plain = run(dataset, tmp_path / "plain", max_steps=3)
    assert train_losses(checkpointed) == pytest.approx(train_losses(plain), abs=1e-6)
    assert_same_weights(weights(checkpointed), weights(plain), atol=1e-6)


@pytest.mark.slow
def test_compiled_training_matches_eager(dataset, tmp_path):
    compiled = run(dataset, tmp_path / "compiled", compile=True, max_steps=3)
    eager = run(dataset, tmp_path / "eager", max_steps=3)
    assert train_losses(compiled) == pytest.approx(train_losses(eager), abs=1e-5)
    assert_same_weights(weights(compiled), weights(eager), atol=1e-5)


def test_bfloat16_autocast_trains(dataset, tmp_path):
    run_dir = run(dataset, tmp_path / "bf16", dtype="bfloat16", max_steps=3, checkpoint_interval=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    assert all(w.dtype == torch.float32 for w in weights(run_dir).values())  # fp32 master weights


def test_resume_after_time_budget_stop_is_exact(dataset, tmp_path):
    full = run(dataset, tmp_path / "full", checkpoint_interval=0)
    stopped = run(dataset, tmp_path / "stopped", time_budget_s=1e-9)
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 1
    assert latest_checkpoint(stopped).name == "step_1"
    resumed = run(dataset, tmp_path / "stopped", resume=True)
    assert_same_weights(weights(resumed), weights(full))
    assert train_losses(resumed) == train_losses(full)


# ---- subprocess runs: a killed process (torchrun runs are in test_distributed.py) -------------------------

def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


SLOW_DRIVER = """
import sys, time
import torch
torch.set_num_threads(1)
import lmforge.train.loop as pretrain_module
from lmforge.cli import main
schedule = pretrain_module.lr_at
def slow_lr_at(step, cfg):  # slow the run down so the test can kill it between checkpoints
    time.sleep(0.1)
    return schedule(step, cfg)
pretrain_module.lr_at = slow_lr_at
sys.exit(main(["pretrain", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(dataset, tmp_path):
    settings = dict(max_steps=12, checkpoint_interval=2, keep_checkpoints=2)
    model = {**TINY_MODEL, "dropout": 0.1}  # dropout makes the RNG state part of what must be restored
    config = {**config_dict(dataset, tmp_path / "killed", **settings), "model": model}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "driver.py").write_text(SLOW_DRIVER)
    process = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "config.json")],
                               env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (tmp_path / "killed" / "checkpoints" / "step_4").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (tmp_path / "killed" / "final").exists()

    killed_at = int(latest_checkpoint(tmp_path / "killed").name.removeprefix("step_"))
    assert 4 <= killed_at < 12
    resumed = pretrain(build_config(PretrainConfig, {**config, "resume": True}))
    full = pretrain(build_config(PretrainConfig, {**config, "out_dir": str(tmp_path / "full")}))
    assert_same_weights(weights(resumed), weights(full))
    assert train_losses(resumed) == train_losses(full)
