"""Bad input through the CLI: one line on stderr naming the problem, exit code 2, no traceback, nothing damaged."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer


def run_error(capsys, args: list[str]) -> str:
    """Run the CLI, require exit 2 and a single-line error, return that line."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("bad") / "data"
    assert main(["data", "prepare", "--sources", str(corpus_dir), "--vocab_size", "300", "--out_dir", str(out),
                 "--num_workers", "1", "--val_fraction", "0.1"]) == 0
    return out


def test_missing_empty_and_invalid_utf8_files(tmp_path, capsys, dataset):
    before = (dataset / "meta.json").read_bytes()
    missing = tmp_path / "missing.txt"
    assert str(missing) in run_error(capsys, ["data", "prepare", "--sources", str(missing), "--out_dir", str(dataset)])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in run_error(capsys, ["data", "prepare", "--sources", str(empty), "--out_dir", str(dataset)])
    broken = tmp_path / "latin1.txt"
    broken.write_bytes("caf\u00e9 au lait is a drink".encode("latin-1"))
    err = run_error(capsys, ["data", "prepare", "--sources", str(broken), "--out_dir", str(dataset)])
    assert "latin1.txt" in err and "UTF-8" in err
    assert (dataset / "meta.json").read_bytes() == before  # the existing dataset is untouched


def test_empty_corpus_after_filtering(tmp_path, capsys, dataset):
    short = tmp_path / "short.txt"
    short.write_text("ok\n")
    err = run_error(capsys, ["data", "prepare", "--sources", str(short), "--out_dir", str(dataset)])
    assert "empty" in err.lower() or "no documents" in err.lower()
    assert (dataset / "meta.json").is_file()


def test_unknown_config_key_and_wrong_type(tmp_path, capsys, dataset):
    config = tmp_path / "c.toml"
    config.write_text(f'out_dir = "{tmp_path / "run"}"\n[data]\ndataset = "{dataset}"\n[train]\nlearning_rate = 1\n')
    assert "'train.learning_rate'" in run_error(capsys, ["pretrain", "--config", str(config)])
    assert "'train.max_steps'" in run_error(capsys, ["pretrain", "--data.dataset", str(dataset),
                                                     "--train.max_steps", "many"])
    assert not (tmp_path / "run").exists()


def test_tokenizer_vocabulary_must_fit_the_model(tmp_path, capsys, dataset):
    err = run_error(capsys, ["pretrain", "--data.dataset", str(dataset), "--model.vocab_size", "100",
                             "--out_dir", str(tmp_path / "run")])
    assert "300" in err and "100" in err
    model_dir = tmp_path / "small_vocab_model"
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=100)).save(model_dir)
    for name in ("tokenizer.json", "lmforge_tokenizer.json"):
        (model_dir / name).write_bytes((dataset / "tokenizer" / name).read_bytes())
    err = run_error(capsys, ["generate", "--model", str(model_dir), "--prompt", "the river"])
    assert "300" in err and "100" in err


def test_prompt_longer_than_the_context(tmp_path, capsys, dataset):
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=300, block_size=16)).save(model_dir)
    for name in ("tokenizer.json", "lmforge_tokenizer.json"):
        (model_dir / name).write_bytes((dataset / "tokenizer" / name).read_bytes())
    err = run_error(capsys, ["generate", "--model", str(model_dir), "--prompt", "the river walks " * 20])
    assert "16" in err


def test_missing_dataset_and_resume_without_checkpoint(tmp_path, capsys, dataset):
    assert "nothing" in run_error(capsys, ["pretrain", "--data.dataset", str(tmp_path / "nothing"),
                                           "--out_dir", str(tmp_path / "r")])
    err = run_error(capsys, ["pretrain", "--data.dataset", str(dataset), "--out_dir", str(tmp_path / "fresh"),
                             "--resume"])
    assert "checkpoint" in err


def test_corrupt_model_dir(tmp_path, capsys):
    model_dir = tmp_path / "model"
    Transformer(ModelConfig.preset("tiny-gpt2", vocab_size=50)).save(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "model.safetensors" in run_error(capsys, ["info", str(model_dir)])
    (model_dir / "config.json").write_text(json.dumps({"lmforge_model": True, "n_layer": "two"}))
    assert "n_layer" in run_error(capsys, ["info", str(model_dir)])
