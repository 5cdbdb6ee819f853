"""Instruction tuning: packing parity, loss masks, the stage end to end in every data format, resume, bad input."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.errors import DataError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.stages.config import SFTConfig
from lmforge.stages.sft import sft
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.metrics import MetricsLog
from lmforge.train.packing import collate, pack_examples, pad_examples

from conftest import kill_after_checkpoint
from test_train import assert_same_weights, train_losses, weights

PAIRS = [("a dog is a kind of", "animal"), ("the opposite of hot", "cold"), ("2 + 3", "5"), ("the cat", "die Katze"),
         ("a rose is a kind of", "flower"), ("the opposite of up", "down"), ("4 + 4", "8"), ("the dog", "der Hund")]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chat_records(fmt: str, n: int = 48) -> list[dict]:
    out = []
    for i in range(n):
        q, a = PAIRS[i % len(PAIRS)]
        out.append({"alpaca": {"instruction": q, "input": "", "output": a},
                    "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                    "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
                    "prompt_completion": {"prompt": q, "completion": a}}[fmt])
    return out


def config(base: Path, files: list[str], out_dir: Path, **overrides) -> SFTConfig:
    data = {"train": files, "val_fraction": 0.2, **overrides.pop("data", {})}
    tc = {"device": "cpu", "batch_size": 4, "max_steps": 30, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3,
          "eval_interval": 10, "eval_batches": 2, "checkpoint_interval": 10, "log_interval": 1,
          **overrides.pop("train", {})}
    return build_config(SFTConfig, {"model": str(base), "data": data, "train": tc, "out_dir": str(out_dir),
                                    **overrides})


# ---- packing and masks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_packed_rows_give_the_logits_of_each_conversation_alone(style):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(f"tiny-{style}", vocab_size=97, block_size=64, d_model=32)).eval()
    examples = [(torch.randint(0, 97, (n,)).tolist(), [True] * n) for n in (9, 14, 5, 21, 30, 7, 12)]
    rows = pack_examples(examples, seq_len=40, pad_id=0, seed=3)
    assert len(rows) < len(examples) and all(len(r.input_ids) == 40 for r in rows)
    batch = collate(rows, pad_id=0, packed=True, device=torch.device("cpu"))
    with torch.no_grad():
        packed = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        found = 0
        for ids, _ in examples:
            alone = model(torch.tensor([ids[:-1]]))[0]
            for r, row in enumerate(rows):
                for start in range(len(row.input_ids) - len(ids) + 2):
                    if row.input_ids[start:start + len(ids) - 1] == ids[:-1] and row.position_ids[start] == 0:
                        assert torch.allclose(packed[r, start:start + len(ids) - 1], alone, atol=1e-5)
                        found += 1
                        break
        assert found == len(examples)
    unpacked = model(batch["input_ids"])  # without the document mask, later conversations see earlier ones
    assert not torch.allclose(unpacked, packed, atol=1e-3)


def test_targets_cover_every_assistant_turn_only(base):
    tok = Tokenizer.load(base)
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 3"},
                    {"role": "assistant", "content": "5"}, {"role": "user", "content": "4 + 4"},
                    {"role": "assistant", "content": "8"}]
    ids, mask = tok.encode_chat_with_mask(conversation)
    row = pad_examples([(ids, mask)])[0]
    kept = [t for t in row.targets if t != IGNORE_INDEX]
    end = tok.special_ids["end"]
    assert kept == [*tok.encode("5"), end, *tok.encode("8"), end]
    assert row.input_ids == ids[:-1]


# ---- the stage ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "prompt_completion"])
def test_sft_learns_the_answers_in_every_format(base, tmp_path, fmt):
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", chat_records(fmt))
    steps = {"max_steps": 150, "lr": 1e-2, "min_lr": 1e-3} if fmt == "messages" else {"max_steps": 8}
    run_dir = sft(config(base, [str(data)], tmp_path / "run", train=steps))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stage"] == "sft" and summary["train_conversations"] + summary["val_conversations"] == 48
    final = run_dir / "final"
    assert json.loads((final / "training.json").read_text())["chat"] is True
    assert Tokenizer.load(final).uses_lmforge_chat
    train = [r for r in MetricsLog(run_dir / "metrics.jsonl").read() if r["kind"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    if fmt == "messages":  # long enough to learn: greedy replies are the trained answers
        model, tok = Transformer.from_dir(final).eval(), Tokenizer.load(final)
        for q, a in PAIRS[:4]:
            ids = tok.encode_chat([{"role": "user", "content": q}])
            reply = model.generate([ids], tokenizer=tok, max_new_tokens=8, do_sample=False,
                                   eos_id=tok.chat_stop_ids)[0]
            assert reply.text == a and reply.finish_reason == "eos"


def test_padded_batches_and_all_token_loss(base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_records("messages"))
    run_dir = sft(config(base, [str(data)], tmp_path / "run", data={"packing": False, "train_on": "all"},
                         train={"max_steps": 4}))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["packing_fill"] is None and summary["train_rows"] == summary["train_conversations"]


def test_truncation_policies_count_what_they_do(base, tmp_path):
    long_answer = " ".join(["the cat sat on the mat"] * 12)
    records = chat_records("messages", 16) + [{"messages": [{"role": "user", "content": "tell"},
                                                            {"role": "assistant", "content": long_answer}]}] * 3
    data = write_jsonl(tmp_path / "d.jsonl", records)
    for policy, truncated, dropped in (("truncate", 3, 0), ("drop", 0, 3)):
        run_dir = sft(config(base, [str(data)], tmp_path / policy, data={"truncation": policy, "val_fraction": 0.0},
                             train={"max_steps": 2}))
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["truncated"], summary["dropped"]) == (truncated, dropped)
        assert any("truncated" in w for w in summary["warnings"])
    with pytest.raises(DataError, match=r"d\.jsonl:17: the conversation has \d+ tokens, more than seq_len \+ 1 = 65"):
        sft(config(base, [str(data)], tmp_path / "err", data={"truncation": "error", "val_fraction": 0.0}))
    assert not (tmp_path / "err").exists()


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_records("messages"))
    cfg = config(base, [str(data)], tmp_path / "killed", train={"max_steps": 12, "checkpoint_interval": 2})
    from lmforge.config import config_to_dict

    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    kill_after_checkpoint("sft", tmp_path / "config.json", tmp_path / "killed", step=4)
    assert not (tmp_path / "killed" / "final").exists() and latest_checkpoint(tmp_path / "killed") is not None
    assert main(["sft", "--config", str(tmp_path / "config.json"), "--resume"]) == 0
    full = sft(config(base, [str(data)], tmp_path / "full", train={"max_steps": 12, "checkpoint_interval": 2}))
    assert_same_weights(weights(tmp_path / "killed"), weights(full))
    assert train_losses(tmp_path / "killed") == train_losses(full)


# ---- bad input: one line, exit 2, nothing written -----------------------------------------------------------

@pytest.mark.parametrize("lines, said", [
    (["{not json"], r"bad\.jsonl:1: not valid JSON"),
    ([{"question": "x"}], r"bad\.jsonl:1: not a known chat format \(keys: question\)"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], r"bad\.jsonl:1: the conversation has no assistant turn"),
    ([{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     r"bad\.jsonl:1: messages\[0\]: unknown role 'wizard'"),
    ([{"instruction": "hi"}], r"bad\.jsonl:1: missing output"),
    ([], r"bad\.jsonl: no records"),
])
def test_bad_data_is_one_line_naming_file_and_line(base, tmp_path, capsys, lines, said):
    import re

    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(chat_records("messages", 1)[0])] * 0 + lines)
    assert main(["sft", str(base), "--data.train", str(bad), "--out_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(said, err), err
    assert not (tmp_path / "run").exists()


def test_base_model_without_tokenizer_is_refused(tmp_path, capsys):
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=320, block_size=64, d_model=32)).save(tmp_path / "bare")
    data = write_jsonl(tmp_path / "d.jsonl", chat_records("messages", 4))
    assert main(["sft", str(tmp_path / "bare"), "--data.train", str(data), "--out_dir", str(tmp_path / "run")]) == 2
    assert "no tokenizer files" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_sft_from_a_hugging_face_base_keeps_its_chat_template(base, tmp_path):
    pytest.importorskip("transformers")
    hf_dir = tmp_path / "hf"
    assert main(["convert", str(base), str(hf_dir), "--to", "hf"]) == 0
    (hf_dir / "lmforge_tokenizer.json").unlink()  # a plain Hugging Face dir: tokenizer.json + tokenizer_config.json
    data = write_jsonl(tmp_path / "d.jsonl", chat_records("messages", 16))
    run_dir = sft(config(hf_dir, [str(data)], tmp_path / "run", train={"max_steps": 2}))
    final = Tokenizer.load(run_dir / "final")
    assert final.uses_lmforge_chat and final.fingerprint == Tokenizer.load(base).fingerprint
    assert main(["chat", str(run_dir / "final"), "--prompt", "2 + 3", "--temperature", "0",
                 "--max_new_tokens", "3"]) == 0


def test_accumulation_weighs_conversations_by_their_tokens(base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", chat_records("messages"))
    split = sft(config(base, [str(data)], tmp_path / "split", data={"packing": False},
                       train={"max_steps": 3, "batch_size": 2, "grad_accum": 4}))
    whole = sft(config(base, [str(data)], tmp_path / "whole", data={"packing": False},
                       train={"max_steps": 3, "batch_size": 8, "grad_accum": 1}))
    assert train_losses(split) == pytest.approx(train_losses(whole), abs=1e-5)
    assert_same_weights(weights(split), weights(whole), atol=1e-5)
