"""The lifecycle through the CLI, as a user runs it: every command, end to end, on a tiny corpus and model."""

import json

import pytest
import torch

import lmforge
from lmforge.cli import main

pytestmark = pytest.mark.slow

TINY_MODEL = ["--model.n_layer", "2", "--model.n_head", "4", "--model.n_kv_head", "2", "--model.d_model", "32",
              "--model.block_size", "64", "--model.vocab_size", "320"]
TINY_TRAIN = ["--train.batch_size", "8", "--train.max_steps", "6", "--train.warmup_steps", "2",
              "--train.eval_interval", "3", "--train.eval_batches", "2", "--train.checkpoint_interval", "3",
              "--train.log_interval", "1", "--train.peak_flops", "1e11", "--data.seq_len", "32"]


def test_lifecycle_through_the_cli(corpus_dir, tmp_path, capsys):
    tok_dir, data_dir, run_dir = tmp_path / "tok", tmp_path / "data", tmp_path / "run"
    assert main(["tokenizer", "train", "--input", str(corpus_dir), "--vocab_size", "300",
                 "--out_dir", str(tok_dir)]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert main(["data", "prepare", "--sources", f"{corpus_dir}:name=fixture", "--tokenizer", str(tok_dir),
                 "--out_dir", str(data_dir), "--num_workers", "1", "--val_fraction", "0.1"]) == 0
    meta = json.loads((data_dir / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["splits"]["val"]["tokens"] > 0 and "fixture" in meta["sources"]

    assert main(["pretrain", "--data.dataset", str(data_dir), "--out_dir", str(run_dir), *TINY_MODEL,
                 *TINY_TRAIN]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_bpb"] > 0
    assert (run_dir / "loss.png").stat().st_size > 0 and (run_dir / "final" / "tokenizer.json").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]

    # a longer run resumed from the step-6 checkpoint continues where it stopped
    assert main(["pretrain", "--config", str(run_dir / "config.json"), "--resume", "--train.max_steps", "8"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8

    final = run_dir / "final"
    capsys.readouterr()
    assert main(["generate", "--model", str(final), "--prompt", "The river", "--prompt", "A quiet garden",
                 "--max_new_tokens", "8", "--temperature", "0"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 2

    assert main(["info", str(final)]) == 0
    hf_dir = tmp_path / "hf"
    assert main(["convert", str(final), str(hf_dir), "--to", "hf"]) == 0
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model, tok = lmforge.load(final), lmforge.Tokenizer.load(final)
    assert hf_tok("The river")["input_ids"] == tok.encode("The river")
    ids = torch.tensor([tok.encode("The river walks slowly under the bridge")])
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, model(ids), atol=1e-4)


def test_quickstart_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    args = ["quickstart", "--out_dir", str(out), "--corpus", "stdlib-docstrings", "--preset", "tiny-llama",
            "--vocab_size", "320", "--seq_len", "32", "--batch_size", "8", "--max_steps", "4", "--eval_interval", "2",
            "--max_new_tokens", "5"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["corpus"] == "stdlib-docstrings" and summary["steps"] == 4 and len(summary["samples"]) == 3
    for key in ("parameters", "tokens_seen", "wall_s", "val_bpb", "tokens_per_s"):
        assert summary[key] > 0, key
    assert "bits/byte" in printed and summary["samples"][0]["prompt"] in printed
    # running it again reuses the prepared data and replaces the previous run instead of refusing
    assert main(args) == 0
    assert "reusing" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
