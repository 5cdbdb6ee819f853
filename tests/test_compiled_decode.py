"""Decoding through the step compiled ahead of time (lmforge.infer.compiled): the same tokens and logits as eager
decoding, reuse while the weights are unchanged, a fresh compile after they change, the CLI option."""

import os

import pytest
import torch
from test_generate import GREEDY, tiny

from lmforge.errors import ConfigError
from lmforge.infer import compiled
from lmforge.infer.generate import GenerationConfig, generate

slow = pytest.mark.slow  # each compile takes 15-20 s on 2 cores

PROMPTS = [[5, 17, 99, 3, 250], [42, 7], [9]]  # left-padded to 5 columns


@pytest.fixture(autouse=True)
def decode_cache(tmp_path, monkeypatch):
    """Compiled steps go to a fresh cache dir, and the in-process ones are forgotten: every test compiles."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    compiled._compiled.clear()
    return tmp_path / "cache" / "decode"


def token_ids(model, prompts, **cfg) -> list[list[int]]:
    return [c.token_ids for c in generate(model, prompts, GenerationConfig(max_new_tokens=20, **cfg))]


@slow
@pytest.mark.parametrize("style", ["llama", "gpt2"])  # rope + GQA + RMSNorm + SwiGLU; learned + LayerNorm + biases
def test_compiled_decoding_equals_eager(style):
    model = tiny(style)
    assert token_ids(model, PROMPTS, compile=True, **GREEDY) == token_ids(model, PROMPTS, **GREEDY)
    penalised = dict(GREEDY, repetition_penalty=1.3)
    assert token_ids(model, PROMPTS, compile=True, **penalised) == token_ids(model, PROMPTS, **penalised)
    assert len(compiled._compiled[model]) == 1  # the same batch size and cache length: compiled once


@slow
def test_a_new_process_loads_the_compiled_step_from_disk(decode_cache, capsys):
    model = tiny("llama", seed=2)
    expected = token_ids(model, PROMPTS, **GREEDY)
    assert token_ids(model, PROMPTS, compile=True, **GREEDY) == expected
    assert "decode step compiled" in capsys.readouterr().err and len(list(decode_cache.glob("*.pt2"))) == 1
    compiled._compiled.clear()  # what a new process starts with
    assert token_ids(model, PROMPTS, compile=True, **GREEDY) == expected
    assert "decode step loaded from" in capsys.readouterr().err
    package = next(decode_cache.glob("*.pt2"))
    package.write_bytes(b"not a package")  # a damaged file is compiled again and replaced
    compiled._compiled.clear()
    assert token_ids(model, PROMPTS, compile=True, **GREEDY) == expected
    assert "ignoring the compiled decode step" in capsys.readouterr().err and package.stat().st_size > 1000


@slow
def test_compiled_step_logits_equal_the_model_on_a_padded_batch():
    model = tiny("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 11], [0, 0, 1, 2, 3, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]).bool()
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    with torch.no_grad():
        expected = model(ids, position_ids=positions, attention_mask=mask)[:, -1]  # (2, V)
        cache = model.new_kv_cache(2, 64)
        model.hidden_states(ids[:, :5], position_ids=positions[:, :5], attention_mask=mask[:, :5], kv_cache=cache)
        step = compiled.compiled_decode_step(model, 2, 64)
        logits = step(ids[:, 5], torch.tensor([5]), torch.tensor([0, 2]), list(cache.k.unbind(0)),
                      list(cache.v.unbind(0)))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@slow
def test_changed_weights_are_compiled_again():
    model = tiny("llama", seed=1)
    before = token_ids(model, PROMPTS[:1], compile=True, **GREEDY)
    with torch.no_grad():  # what an optimizer step does: parameters change in place
        for param in model.parameters():
            param.mul_(-1.5)
    after = token_ids(model, PROMPTS[:1], compile=True, **GREEDY)
    assert after == token_ids(model, PROMPTS[:1], **GREEDY) and after != before
    assert len(compiled._compiled[model]) == 2


def test_cache_length_is_bucketed_and_capped():
    assert compiled.cache_length(32, 128, 1024) == 256
    assert compiled.cache_length(5, 20, 64) == 64
    assert compiled.cache_length(100, 28, 1024) == 128


def test_compile_without_aot_inductor_is_a_clear_error(monkeypatch):
    monkeypatch.delattr(torch._inductor, "aoti_compile_and_package")
    with pytest.raises(ConfigError, match=r"^generation compile=true needs torch >= 2\.6"):
        token_ids(tiny("llama"), PROMPTS, compile=True, **GREEDY)


@slow
def test_cli_generate_compiled(model_dir, capsys):
    from lmforge.cli import main

    args = ["generate", "--model", str(model_dir), "--prompt", "the cat", "--prompt", "a dog is",
            "--max_new_tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    assert main(args + ["--compile", "true"]) == 0
    captured = capsys.readouterr()
    assert captured.out == eager and "decode step compiled" in captured.err


def test_compile_is_for_the_cpu():
    model = tiny("llama").to("meta")  # any device but the CPU
    with pytest.raises(ConfigError, match=r"^generation compile=true: the compiled decode step is built for the CPU"):
        compiled.compiled_decode_step(model, 1, 64)


def test_disk_cache_is_pruned_least_recently_used_first(decode_cache, monkeypatch, capsys):
    decode_cache.mkdir(parents=True)
    packages = []
    for age, name in enumerate(["new", "mid", "old", "oldest"]):  # 1 MiB each, `new` the most recently used
        path = decode_cache / f"{name}.pt2"
        path.write_bytes(b"\0" * 2**20)
        stamp = 1_000_000 - 100 * age
        os.utime(path, (stamp, stamp))
        packages.append(path)
    (decode_cache / "notes.txt").write_text("not a package")
    just_compiled = decode_cache / "just.pt2"
    just_compiled.write_bytes(b"\0" * 2**20)
    os.utime(just_compiled, (1, 1))  # the package being kept stays whatever its age
    monkeypatch.setenv("LMFORGE_DECODE_CACHE_MB", "3.5")
    removed = compiled.prune_disk_cache(just_compiled)
    assert sorted(p.name for p in removed) == ["old.pt2", "oldest.pt2"]
    assert sorted(p.name for p in decode_cache.iterdir()) == ["just.pt2", "mid.pt2", "new.pt2", "notes.txt"]
    assert "removed 2 least recently used" in capsys.readouterr().err
    monkeypatch.setenv("LMFORGE_DECODE_CACHE_MB", "0")
    assert [p.name for p in compiled.prune_disk_cache(just_compiled)] == ["new.pt2", "mid.pt2"]
    assert just_compiled.exists()


@pytest.mark.parametrize("value", ["lots", "-1", "inf"])
def test_bad_disk_cache_budget_is_a_clear_error_before_compiling(monkeypatch, value):
    monkeypatch.setenv("LMFORGE_DECODE_CACHE_MB", value)
    with pytest.raises(ConfigError, match="LMFORGE_DECODE_CACHE_MB"):
        generate(tiny("llama"), PROMPTS, GenerationConfig(max_new_tokens=2, compile=True))
