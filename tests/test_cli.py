"""The CLI: dispatch, help, config files and overrides, one-line errors with exit code 2, convert and info."""

import subprocess
import sys

import pytest
import torch

from lmforge.cli import COMMANDS, main
from lmforge.convert import load
from lmforge.model import ModelConfig, Transformer


def _tiny_model(tmp_path, preset="tiny-llama"):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=97, block_size=32))
    model.save(tmp_path / "model")
    return model, tmp_path / "model"


def test_overview_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert " ".join(cmd.path) in out
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c.path))
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd.path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and cmd.example.split()[0] == "lmforge"


def test_info_prints_parameters(tmp_path, capsys):
    model, path = _tiny_model(tmp_path)
    assert main(["info", str(path)]) == 0
    assert f"{model.num_parameters():,}" in capsys.readouterr().out


def test_convert_round_trip_through_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, path = _tiny_model(tmp_path)
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(path), str(hf_dir), "--to", "hf"]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert main(["convert", str(hf_dir), str(back_dir)]) == 0
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model.eval()(ids)
        assert torch.allclose(hf_model(ids).logits, ref, atol=1e-4)
        assert torch.allclose(load(back_dir)(ids), ref, atol=1e-4)


def test_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err and "Traceback" not in err
    cfg = tmp_path / "c.toml"
    cfg.write_text("bogus = 1\n")
    assert main(["convert", "--config", str(cfg)]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def test_convert_refuses_to_overwrite_its_source(tmp_path, capsys):
    _, path = _tiny_model(tmp_path)
    assert main(["convert", str(path), str(path)]) == 2
    assert "is the source" in capsys.readouterr().err
    assert load(path) is not None


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "pretrain" in result.stdout


def test_list_options_repeat_and_keep_commas():
    from lmforge.cli import build_parser, find_command

    cmd, rest = find_command(["generate", "--prompt", "Hello, world", "--prompt", "Hi", "--stop", ","])
    args = vars(build_parser(cmd).parse_args(rest))
    assert args["cfg:prompt"] == ["Hello, world", "Hi"] and args["cfg:stop"] == [","]


def test_convert_records_special_token_ids(tmp_path):
    import json

    from lmforge.tokenizer import MIN_VOCAB_SIZE, Tokenizer

    _, path = _tiny_model(tmp_path)
    tokenizer = Tokenizer.train(["hello world, the quick brown fox"] * 20, vocab_size=MIN_VOCAB_SIZE)
    tokenizer.save(path)
    hf_dir, back_dir = tmp_path / "hf", tmp_path / "back"
    assert main(["convert", str(path), str(hf_dir), "--to", "hf"]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (
        tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id)
    (hf_dir / "lmforge_tokenizer.json").unlink()  # a plain HF dir: tokenizer.json + tokenizer_config.json
    assert main(["convert", str(hf_dir), str(back_dir)]) == 0
    back = Tokenizer.load(back_dir)
    assert back.eos_id == tokenizer.eos_id and back.fingerprint == tokenizer.fingerprint


def test_convert_refuses_to_replace_a_dir_that_is_not_a_model(tmp_path, capsys):
    _, path = _tiny_model(tmp_path)
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert main(["convert", str(path), str(run_dir), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "is a run dir, not a model dir" in err and err.count("\n") == 1
    assert (run_dir / "metrics.jsonl").read_text() == "{}\n"
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0  # a model dir is replaced


def test_options_are_never_prefix_matched_and_misspellings_suggest(capsys):
    for argv, said in ((["pretrain", "--train.max_step", "10"], "unknown option --train.max_step (did you mean "
                        "--train.max_steps?)"),
                       (["pretrain", "--model.vocab", "10"], "unknown option --model.vocab (did you mean "
                        "--model.vocab_size?)"),
                       (["info", "a", "b"], "unexpected argument 'b'")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err and err.count("\n") == 1, err
    assert main(["pretrian"]) == 2
    assert "did you mean 'pretrain'?" in capsys.readouterr().err


def test_version_and_positional_model(capsys, tmp_path):
    from lmforge import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"lmforge {__version__}"
    from lmforge.cli import build_parser, find_command

    cmd, rest = find_command(["generate", "runs/x/final", "--prompt", "hi"])
    assert vars(build_parser(cmd).parse_args(rest))["_pos_model"] == "runs/x/final"


def test_help_does_not_import_torch():
    code = ("import sys; from lmforge.cli import build_parser, find_command, COMMANDS\n"
            "for c in COMMANDS:\n    build_parser(c)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_a_run_dir_where_a_model_dir_is_expected_points_to_final(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "final").mkdir()
    (run_dir / "config.json").write_text('{"out_dir": "run", "train": {}}')
    for argv in (["info", str(run_dir)], ["generate", str(run_dir), "--prompt", "a"],
                 ["convert", str(run_dir), str(tmp_path / "hf")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{run_dir} is a run dir, not a model dir: its trained model is {run_dir / 'final'}" in err, err


def test_convert_never_replaces_the_run_dir_holding_its_source(tmp_path, capsys):
    _, path = _tiny_model(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_1").mkdir(parents=True)
    path.rename(run_dir / "final")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert main(["convert", str(run_dir / "final"), str(run_dir), "--to", "hf"]) == 2
    assert "holds this command's input" in capsys.readouterr().err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_convert_without_tokenizer_warns_and_files_follow_the_umask(tmp_path, capsys):
    import os

    _, path = _tiny_model(tmp_path)  # weights only, no tokenizer files
    assert main(["convert", str(path), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert "has no tokenizer files" in capsys.readouterr().out
    mask = os.umask(0)
    os.umask(mask)
    for model_dir in (path, tmp_path / "hf"):
        assert (model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_list_options_split_on_commas_except_free_text():
    from lmforge.cli import _split_commas

    assert _split_commas("data.builtin_tasks", ["antonym,nli", "hypernym"]) == ["antonym", "nli", "hypernym"]
    assert _split_commas("prompt", ["Hello, world"]) == ["Hello, world"]
    assert _split_commas("stop", [","]) == [","]
    assert _split_commas("peft.targets", "q,v") == "q,v"  # a single value is the config parser's to split
