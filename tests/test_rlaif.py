"""RLAIF: an AI judge (a model reading a rubric, or a reward model) labels a policy's sampled responses; the file
trains DPO, both orders cancel a judge's position bias, agreement with true labels, ranked lists, bad input."""

import json
import shutil
from pathlib import Path

import pytest

import lmforge.eval.loglik
import lmforge.tasks.builtin
from lmforge.cli import main
from lmforge.config import build_config
from lmforge.eval.loglik import Scored
from lmforge.stages.config import PromptDataSection, RewardConfig
from lmforge.stages.dpo import dpo
from lmforge.stages.judge import judge_pairs, load_judge, order_verdicts, rank_by_wins, ranking_margin
from lmforge.stages.reward import load_reward_model, reward, reward_scores
from lmforge.stages.rlaif import judge_agreement, load_rlaif_prompts
from lmforge.tasks.preferences import builtin_preferences, read_preferences
from lmforge.tasks.spec import PREFERENCE_TASKS, TaskExample, stable_hash

from test_preference import QUESTIONS, dpo_config, pair_records, train_section, write_jsonl


@pytest.fixture
def fake_builtin(monkeypatch):
    """The built-in sets without a download: each preference set holds two of QUESTIONS as (chosen, rejected)."""
    def load_task(name, split, cache_dir=None, limit=None):
        start = 2 * PREFERENCE_TASKS.index(name)
        pairs = QUESTIONS[start:start + 2]
        return [TaskExample(f"{name}:{q}", q, [good], [good, bad], 0) for q, good, bad in pairs][:limit or None]

    monkeypatch.setattr(lmforge.tasks.builtin, "load_task", load_task)


@pytest.fixture(scope="module")
def reward_judge(base, tmp_path_factory) -> Path:
    """A tiny reward model that prefers QUESTIONS' good answers (it memorizes them in 30 steps)."""
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "p.jsonl", pair_records())
    cfg = build_config(RewardConfig, {"model": str(base), "data": {"train": [str(data)], "val": [str(data)]},
                                      "out_dir": str(root / "run"), "train": train_section(max_steps=30)})
    return reward(cfg) / "final"


def prompt_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _, _ in QUESTIONS])


def rlaif_args(policy: Path, judge: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["rlaif", str(policy), "--judge", str(judge), "--data.train", str(prompts), "--limit", "4",
            "--max_new_tokens", "6", "--device", "cpu", "--out", str(out), *extra]


def test_model_judge_from_the_cli_writes_pairs_that_train_dpo(base, tmp_path, fake_builtin, capsys):
    out = tmp_path / "rlaif.jsonl"
    assert main(rlaif_args(base, base, prompt_file(tmp_path), out, "--agreement_limit", "2")) == 0
    items = read_preferences([out])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert len(items) == report["records"] == 4 - report["skipped_identical"] >= 3
    assert all(len(i.responses) == 2 for i in items) and {i.prompt[0]["content"] for i in items} <= \
        {q for q, _, _ in QUESTIONS[:4]}
    assert all(r["source"] == "rlaif" and r["judge_margin"] >= 0 for r in records)
    assert report["judge_kind"] == "rubric (plain format, both orders)" and report["judge_prompts_cut"] > 0
    agreement = report["agreement"]
    assert list(agreement) == [*PREFERENCE_TASKS, "overall"] and agreement["overall"]["pairs"] == 6
    assert {"agreement", "chosen_as_a", "chosen_as_b", "says_a"} <= agreement["overall"].keys()
    printed = capsys.readouterr().out
    assert "records (" in printed and "chosen=A" in printed and "overall" in printed
    again = tmp_path / "again.jsonl"  # the same seed samples and judges the same
    assert main(rlaif_args(base, base, prompt_file(tmp_path), again, "--agreement_limit", "0")) == 0
    assert again.read_text() == out.read_text()
    run = dpo(dpo_config(base, [str(out)], tmp_path / "dpo", train={"max_steps": 2}))
    assert (run / "final" / "model.safetensors").is_file()


def test_reward_judge_ranks_three_samples_by_score_and_agrees_with_true_labels(base, reward_judge, tmp_path,
                                                                               fake_builtin):
    out = tmp_path / "ranked.jsonl"
    assert main(rlaif_args(base, reward_judge, prompt_file(tmp_path), out, "--samples", "3",
                           "--agreement_limit", "2")) == 0
    items = read_preferences([out])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(len(r.get("responses", [])) == 3 for r in records)  # a ranked list where the three differ
    model, tokenizer = load_reward_model(str(reward_judge))
    for item, record in zip(items, records):
        scores = reward_scores(model, tokenizer, [item.prompt] * len(item.responses), item.responses)
        assert scores == sorted(scores, reverse=True)  # best first
        pairs = [(i, j) for i in range(len(scores)) for j in range(i + 1, len(scores))]
        assert record["judge_margin"] == pytest.approx(sum(scores[i] - scores[j] for i, j in pairs) / len(pairs),
                                                       abs=1e-4)
    report = json.loads(Path(f"{out}.report.json").read_text())
    assert report["judge_kind"] == "reward model" and report["pairs"] >= len(items)
    assert report["agreement"]["overall"] == {"pairs": 6, "agreement": 1.0}  # it learned these labels


def test_both_orders_cancel_the_judges_position_bias(base, fake_builtin, monkeypatch):
    judge = load_judge(base, rubric="Prefer the correct answer.")
    questions, a, b = ["2 + 3", "the cat"], ["5", "die Katze"], ["6", "der Hund"]
    single = order_verdicts(judge, questions, a, a)  # the same response in both places: only the bias remains
    assert all(abs(v) > 1e-4 for v in single)
    assert judge_pairs(judge, questions, a, a) == [0.0, 0.0]
    assert judge_pairs(judge, questions, a, b) == pytest.approx([-p for p in judge_pairs(judge, questions, b, a)])
    letter_a = judge.fmt.continuation_ids("A")

    def always_a(model, requests, batch_size=16):  # a judge that answers A whatever it reads
        return [Scored(-0.1 if list(cont) == letter_a else -3.0, False, len(cont)) for _, cont in requests]

    monkeypatch.setattr(lmforge.eval.loglik, "continuation_logprobs", always_a)
    assert judge_pairs(judge, questions, a, b) == [0.0, 0.0]  # no preference left
    items = builtin_preferences("test")
    averaged = judge_agreement(judge, items)["overall"]
    assert averaged == {"pairs": 6, "agreement": 0.0, "chosen_as_a": 1.0, "chosen_as_b": 0.0, "says_a": 1.0}
    judge.both_orders = False
    assert judge_pairs(judge, questions, a, b) == pytest.approx([2.9, 2.9])
    shown_first = [stable_hash(f"rlaif-agreement:{item.where}") >= 0.5 for item in items]
    assert judge_agreement(judge, items)["overall"]["agreement"] == sum(shown_first) / len(items)


def test_ranking_by_wins_and_prompts_spread_over_the_sets(tmp_path, fake_builtin):
    # 0 beats 1, 1 beats 2, 2 beats 0 (one win each): the summed preference decides, then the index
    cycle = [[0, 1, -2], [-1, 0, 1], [2, -1, 0]]
    assert rank_by_wins(cycle) == [2, 1, 0] and ranking_margin(cycle, [2, 1, 0]) == 0.0
    scored = [[0, -1, 2], [1, 0, 3], [-2, -3, 0]]  # a reward model's score differences: ranked by score
    assert rank_by_wins(scored) == [1, 0, 2] and ranking_margin(scored, [1, 0, 2]) == pytest.approx(2.0)
    assert rank_by_wins([[0, 0, 0], [0, 0, 0], [0, 0, 0]]) == [0, 1, 2]
    assert rank_by_wins([[0, -1, -1], [1, 0, 0.5], [1, -0.5, 0]]) == [1, 2, 0]
    data = PromptDataSection(train=["builtin", str(prompt_file(tmp_path))])
    prompts = load_rlaif_prompts(data, "train", 5)
    assert [p.where.split(":")[0].split()[0] for p in prompts] == [*PREFERENCE_TASKS, str(tmp_path / "prompts.jsonl"),
                                                                   PREFERENCE_TASKS[0]]
    assert len(load_rlaif_prompts(data, "train", 0)) == 6 + len(QUESTIONS)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("extra, said", [
    (["--limit", "-1"], "limit=-1: expected >= 0"),
    (["--samples", "1"], "samples=1: expected at least 2"),
    (["--temperature", "0"], "temperature=0.0: expected > 0"),
    (["--rubric_file", "missing.txt"], "rubric_file missing.txt: not found"),
])
def test_bad_options_are_one_line_errors(base, tmp_path, extra, said, capsys):
    out = tmp_path / "out.jsonl"
    assert main(rlaif_args(base, base, prompt_file(tmp_path), out, *extra)) == 2
    assert said in _one_line_error(capsys) and not out.exists()


def test_bad_judge_dirs_and_outputs_are_one_line_errors(base, tmp_path, capsys):
    no_tokenizer = tmp_path / "judge"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, no_tokenizer / name)
    out = tmp_path / "out.jsonl"
    assert main(rlaif_args(base, no_tokenizer, prompt_file(tmp_path), out)) == 2
    assert "its tokenizer does not load" in _one_line_error(capsys) and not out.exists()
    (no_tokenizer / "tokenizer.json").write_text("{not json")
    assert main(rlaif_args(base, no_tokenizer, prompt_file(tmp_path), out)) == 2
    assert "its tokenizer does not load" in _one_line_error(capsys)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    assert main(rlaif_args(base, base, prompt_file(tmp_path), notes)) == 2
    assert "is not a .jsonl file" in _one_line_error(capsys) and notes.read_text() == "keep me\n"
    prompts = prompt_file(tmp_path)
    before = prompts.read_bytes()
    assert main(rlaif_args(base, base, prompts, prompts)) == 2  # the output may not replace an input
    assert "is one of this command's inputs" in _one_line_error(capsys) and prompts.read_bytes() == before
