"""Preference data, reward models and DPO: losses against TRL and worked numbers, the stages end to end, exact
resume after SIGKILL, eval of preference sets, bad input."""

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config, config_to_dict
from lmforge.errors import DataError
from lmforge.objectives.dpo import dpo_loss
from lmforge.objectives.reward import bradley_terry_loss
from lmforge.stages.config import DPOConfig, RewardConfig
from lmforge.stages.dpo import dpo
from lmforge.stages.reward import load_reward_model, reward, reward_scores
from lmforge.tasks.preferences import parse_preference, read_preferences
from lmforge.train.checkpoint import latest_checkpoint
from lmforge.train.metrics import MetricsLog

from conftest import kill_after_checkpoint, run_on_two_processes
from test_train import assert_same_weights, train_losses, weights

QUESTIONS = [("2 + 3", "5", "6"), ("the opposite of hot", "cold", "warm"), ("a dog is a kind of", "animal", "mat"),
             ("the cat", "die Katze", "der Hund"), ("4 + 4", "8", "9"), ("the opposite of up", "down", "sat")]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def pair_records(n: int = 48) -> list[dict]:
    return [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in
            (QUESTIONS[i % len(QUESTIONS)] for i in range(n))]


def train_section(**overrides) -> dict:
    return {"device": "cpu", "batch_size": 4, "max_steps": 20, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2,
            "eval_interval": 10, "eval_batches": 2, "checkpoint_interval": 10, "log_interval": 1, **overrides}


def dpo_config(base: Path, files: list[str], out_dir: Path, **overrides) -> DPOConfig:
    held = write_jsonl(out_dir.parent / "held.jsonl", pair_records(6))  # the training questions: memorized
    data = {"train": files, "val": [str(held)], **overrides.pop("data", {})}
    return build_config(DPOConfig, {"model": str(base), "data": data, "out_dir": str(out_dir),
                                    "train": train_section(**overrides.pop("train", {})), **overrides})


# ---- losses: TRL's own code on the same log-probabilities, and worked numbers -----------------------------------

def _trl_dpo_losses(loss_type: str, beta: float, label_smoothing: float, pc, pr, rc, rr, counts_c, counts_r):
    """TRL's DPOTrainer._compute_loss run on a stand-in model whose per-token log-probabilities sum to the given
    sequence log-probabilities, with precomputed reference log-probabilities; returns TRL's (mean) loss and the
    rewards it logs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs, width = len(pc), int(max(max(counts_c), max(counts_r))) + 2
    completion = torch.zeros(2 * pairs, width, dtype=torch.long)
    log_probs = torch.zeros(2 * pairs, width - 1)
    for row, (total, count) in enumerate(zip(list(pc) + list(pr), list(counts_c) + list(counts_r))):
        completion[row, 1:1 + int(count)] = 1
        log_probs[row, :int(count)] = total / count  # shifted: position t predicts token t + 1
    outputs = SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                              mean_logits=torch.zeros_like(log_probs), is_top1=torch.zeros_like(log_probs).bool())
    model = lambda **kwargs: outputs  # noqa: E731
    model.training = True
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    metrics: dict = defaultdict(lambda: defaultdict(list))
    fake = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                           precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                           loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                           _metrics=metrics, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * pairs, width, dtype=torch.long), "attention_mask": torch.ones(2 * pairs, width),
              "completion_mask": completion, "ref_chosen_logps": torch.tensor(rc), "ref_rejected_logps": torch.tensor(rr)}
    loss = DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
    return float(loss), metrics["train"]


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2), ("hinge", 0.0)])
def test_dpo_loss_equals_trls(loss_type, smoothing):
    torch.manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(6) * 20).tolist(), (-torch.rand(6) * 20).tolist(), \
        (-torch.rand(6) * 20).tolist(), (-torch.rand(6) * 20).tolist()
    counts_c, counts_r = [3, 5, 2, 7, 4, 6], [4, 2, 6, 3, 5, 8]
    beta = 0.3
    trl_loss, logged = _trl_dpo_losses(loss_type, beta, smoothing, pc, pr, rc, rr, counts_c, counts_r)
    ours, chosen_r, rejected_r = dpo_loss(torch.tensor(pc), torch.tensor(pr), torch.tensor(rc), torch.tensor(rr), beta,
                                          loss_type, smoothing, torch.tensor(counts_c), torch.tensor(counts_r))
    assert ours.mean().item() == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert chosen_r.mean().item() == pytest.approx(logged["rewards/chosen"][0], rel=1e-5)
    assert rejected_r.mean().item() == pytest.approx(logged["rewards/rejected"][0], rel=1e-5)
    assert (chosen_r - rejected_r).mean().item() == pytest.approx(logged["rewards/margins"][0], rel=1e-5)


def test_dpo_loss_worked_numbers():
    t = torch.tensor
    # log-ratios +1 (chosen) and -1 (rejected): Delta = 2, beta 0.1 -> -log sigmoid(0.2)
    losses, chosen, rejected = dpo_loss(t([-5.0]), t([-7.0]), t([-6.0]), t([-6.0]), beta=0.1)
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.1, -0.1))
    # conservative DPO, e = 0.1: 0.9 * 0.598139 + 0.1 * -log sigmoid(-0.2) = 0.538325 + 0.079814
    losses, _, _ = dpo_loss(t([-5.0]), t([-7.0]), t([-6.0]), t([-6.0]), beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.618139, abs=1e-6)
    # equal policy and reference: Delta = 0, loss log 2 whatever beta
    losses, _, _ = dpo_loss(t([-3.0, -9.0]), t([-4.0, -1.0]), t([-3.0, -9.0]), t([-4.0, -1.0]), beta=0.5)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    # IPO without token counts (the paper's form): (Delta - 1 / (2 beta))^2 = (2 - 5)^2
    losses, _, _ = dpo_loss(t([-5.0]), t([-7.0]), t([-6.0]), t([-6.0]), beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx(9.0)
    # the gradient pushes the chosen log-probability up and the rejected one down
    pc, pr = t([-5.0], requires_grad=True), t([-7.0], requires_grad=True)
    dpo_loss(pc, pr, t([-6.0]), t([-6.0]), beta=0.1)[0].sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), loss_type="kto")


@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_equals_trls_reward_loss(center):
    from trl.trainer.reward_trainer import RewardTrainer

    torch.manual_seed(1)
    chosen, rejected = torch.randn(8), torch.randn(8)
    outputs = SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))
    model = lambda **kwargs: outputs  # noqa: E731
    model.training = True
    fake = SimpleNamespace(model=model, args=SimpleNamespace(center_rewards_coefficient=center), _tp_size=1,
                           accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t),
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0)
    theirs = RewardTrainer.compute_loss(fake, model, {"attention_mask": torch.ones(16, 3)})
    assert bradley_terry_loss(chosen, rejected, center or 0.0).item() == pytest.approx(theirs.item(), rel=1e-6)


def test_bradley_terry_worked_numbers_and_ranked_lists():
    # r_w - r_l = 0: log 2; = log 3: -log(3/4)
    assert bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(2))
    assert bradley_terry_loss(torch.tensor([math.log(3)]), torch.tensor([0.0])).item() == pytest.approx(-math.log(0.75))
    item = parse_preference({"prompt": "q", "responses": ["a", "b", "c", "d"]}, "x")
    assert item.pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(parse_preference({"prompt": "q", "responses": [str(i) for i in range(9)]}, "x").pairs()) == 36


# ---- preference records ---------------------------------------------------------------------------------------

def test_preference_records_in_every_shape(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q2"}],
         "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "d"}]},
        {"prompt": [{"role": "user", "content": "q3"}], "responses": ["best", "mid", "worst"]}])
    items = read_preferences([path])
    assert [i.responses for i in items] == [["a", "b"], ["c", "d"], ["best", "mid", "worst"]]
    assert items[1].prompt[0]["role"] == "system" and items[2].where == f"{path}:3"


@pytest.mark.parametrize("record, said", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"p\.jsonl:1: chosen and rejected are the same response"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, r"p\.jsonl:1: rejected: empty response"),
    ({"prompt": "q", "chosen": "a"}, r"p\.jsonl:1: missing rejected"),
    ({"chosen": "a", "rejected": "b"}, r"p\.jsonl:1: missing prompt"),
    ({"prompt": "q", "responses": ["a", "b", "a"]}, r"p\.jsonl:1: responses: 'a' appears twice"),
    ({"prompt": "q", "responses": ["a"]}, r"p\.jsonl:1: responses: expected a list of at least 2"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     r"p\.jsonl:1: prompt: the prompt must end with a user turn"),
])
def test_bad_preference_records_are_one_line_errors(tmp_path, base, record, said, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=said):
        read_preferences([path])
    assert main(["dpo", str(base), "--data.train", str(path), "--out_dir", str(tmp_path / "run"),
                 "--train.device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl:1" in err[0]
    assert not (tmp_path / "run").exists()


# ---- the stages end to end ------------------------------------------------------------------------------------

def test_reward_model_learns_the_preferences_and_scores_from_cli_python_and_eval(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records() + [
        {"prompt": "2 + 3", "responses": ["5", "6", "9"]}])  # a ranked list among the pairs
    held = write_jsonl(tmp_path / "held.jsonl", pair_records(6))  # the same questions (a tiny model memorizes)
    cfg = build_config(RewardConfig, {"model": str(base), "data": {"train": [str(data)], "val": [str(held)]},
                                      "out_dir": str(tmp_path / "rm"), "train": train_section(max_steps=30)})
    run = reward(cfg)
    summary = json.loads((run / "summary.json").read_text())
    vals = [r for r in MetricsLog(run / "metrics.jsonl").read() if r["kind"] == "val"]
    assert summary["train_pairs"] > summary["train_items"] and summary["val_accuracy"] == 1.0
    assert vals[-1]["val_loss"] < vals[0]["val_loss"] < math.log(2) + 0.2
    model, tokenizer = load_reward_model(str(run / "final"))
    good, bad = reward_scores(model, tokenizer, ["2 + 3", "2 + 3"], ["5", "6"])
    assert good > bad
    assert main(["reward", "score", str(run / "final"), "--prompt", "the opposite of hot", "--response", "cold",
                 "--response", "warm", "--out", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())["scores"]
    assert scores[0]["reward"] > scores[1]["reward"] and scores[0]["response"] == "cold"
    assert main(["reward", "score", str(run / "final"), "--file", str(held)]) == 0
    assert "pair accuracy 1.0000 (6/6" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", str(run / "final"), "--tasks", str(held), "--out", str(report)]) == 0
    result = json.loads(report.read_text())["tasks"]["held"]
    assert result["scored_by"] == "reward model" and result["acc"] == 1.0 and result["margin"] > 0


def test_dpo_raises_preference_accuracy_and_precomputed_reference_equals_live(base, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records())
    pre = dpo(dpo_config(base, [str(data)], tmp_path / "pre", beta=0.5))
    live = dpo(dpo_config(base, [str(data)], tmp_path / "live", beta=0.5, reference_mode="live"))
    pre_losses, live_losses = train_losses(pre), train_losses(live)
    assert pre_losses.keys() == live_losses.keys()
    assert all(abs(pre_losses[k] - live_losses[k]) < 1e-4 for k in pre_losses)
    assert pre_losses[1] == pytest.approx(math.log(2), abs=1e-4)  # the policy starts as the reference
    summary = json.loads((pre / "summary.json").read_text())
    assert summary["val_accuracy"] == 1.0 and summary["val_margin"] > 0 and summary["val_loss"] < 0.5
    assert json.loads((pre / "final" / "training.json").read_text())["stage"] == "dpo"
    held = write_jsonl(tmp_path / "held.jsonl", pair_records(6))
    report = tmp_path / "eval.json"
    assert main(["eval", str(pre / "final"), "--tasks", str(held), "--reference", str(base), "--chat", "true",
                 "--out", str(report)]) == 0
    result = json.loads(report.read_text())["tasks"]["held"]
    assert result["acc"] == 1.0 and result["margin"] > 0 and result["scored_by"].startswith("implicit reward")
    assert main(["eval", str(base), "--tasks", str(held), "--reference", str(base), "--chat", "true",
                 "--out", str(report)]) == 0  # the reference against itself: every margin is 0
    assert json.loads(report.read_text())["tasks"]["held"]["margin"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss_type, extra", [("ipo", {}), ("robust", {"label_smoothing": 0.1}),
                                              ("sigmoid", {"label_smoothing": 0.1})])
def test_dpo_variants_and_lora_train(base, tmp_path, loss_type, extra):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records())
    run = dpo(dpo_config(base, [str(data)], tmp_path / "run", loss_type=loss_type, **extra,
                         peft={"method": "lora", "r": 4} if loss_type == "ipo" else {"method": "none"},
                         train={"max_steps": 12}))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_margin"] > 0
    if loss_type == "ipo":
        assert (run / "final" / "lmforge_adapter.json").is_file()


@pytest.mark.slow
def test_dpo_resume_after_sigkill_is_bit_exact(base, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records())
    cfg = dpo_config(base, [str(data)], tmp_path / "killed", train={"max_steps": 12, "checkpoint_interval": 2})
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    kill_after_checkpoint("dpo", tmp_path / "config.json", tmp_path / "killed", step=4)
    assert not (tmp_path / "killed" / "final").exists() and latest_checkpoint(tmp_path / "killed") is not None
    assert main(["dpo", "--config", str(tmp_path / "config.json"), "--resume"]) == 0
    full = dpo(dpo_config(base, [str(data)], tmp_path / "full", train={"max_steps": 12, "checkpoint_interval": 2}))
    assert_same_weights(weights(tmp_path / "killed"), weights(full))
    assert train_losses(tmp_path / "killed") == train_losses(full)


def test_reference_with_another_tokenizer_is_refused(base, model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records(8))
    assert main(["dpo", str(base), "--reference", str(model_dir), "--data.train", str(data), "--out_dir",
                 str(tmp_path / "run"), "--train.device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "reference" in err and "tokenizer" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_dpo_under_ddp_matches_one_process(base, tmp_path):
    """Two processes (gloo) with a ranked list among the pairs, so micro-batches hold different pair counts."""
    data = write_jsonl(tmp_path / "p.jsonl", pair_records(24) + [
        {"prompt": "2 + 3", "responses": ["5", "6", "9", "7"]}, {"prompt": "4 + 4", "responses": ["8", "9", "3"]}])
    settings = {"max_steps": 4, "batch_size": 4, "grad_accum": 2}
    two_cfg = dpo_config(base, [str(data)], tmp_path / "two", train=settings)
    (tmp_path / "two.json").write_text(json.dumps(config_to_dict(two_cfg)))
    run_on_two_processes("dpo", tmp_path / "two.json")
    one = dpo(dpo_config(base, [str(data)], tmp_path / "one", train=settings))
    assert_same_weights(weights(tmp_path / "two"), weights(one), atol=1e-5)
    two_losses, one_losses = train_losses(tmp_path / "two"), train_losses(one)
    assert all(abs(two_losses[k] - one_losses[k]) < 1e-5 for k in one_losses)


def test_reward_model_with_lora_saves_an_adapter_and_its_head(base, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", pair_records(24))
    cfg = build_config(RewardConfig, {"model": str(base), "data": {"train": [str(data)], "val_fraction": 0.25},
                                      "peft": {"method": "lora", "r": 4}, "out_dir": str(tmp_path / "rm"),
                                      "train": train_section(max_steps=4)})
    final = reward(cfg) / "final"
    assert (final / "lmforge_adapter.json").is_file() and (final / "task_head.safetensors").is_file()
    summary = json.loads((final.parent / "summary.json").read_text())
    assert summary["trainable_parameters"] < summary["parameters"] / 5  # the adapter and the head only
    model, tokenizer = load_reward_model(str(final))
    assert len(reward_scores(model, tokenizer, ["2 + 3"], ["5"])) == 1
