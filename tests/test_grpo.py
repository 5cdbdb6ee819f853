"""GRPO: advantages and losses in worked numbers and against TRL, rewards, shared-prefix rollouts, the stage end to
end (the reward rises), the reference model only when beta > 0, reused rollout batches, exact resume after SIGKILL,
LoRA, bad input."""

import json
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config, config_to_dict
from lmforge.errors import ConfigError, DataError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.rollout import sample_group
from lmforge.infer.sampling import sample_next
from lmforge.objectives.grpo import group_advantages, grpo_loss
from lmforge.objectives.rewards import load_reward, load_rewards, score
from lmforge.stages.config import GRPOConfig
from lmforge.stages.grpo import grpo
from lmforge.stages.rollouts import Prompt, RolloutSource, tokenize_prompts
from lmforge.stages.sft import base_model
from lmforge.train.checkpoint import latest_checkpoint, load_trainer_state
from lmforge.train.metrics import MetricsLog

from conftest import TOY_REWARD, kill_after_checkpoint, run_on_two_processes
from test_sft import PAIRS
from test_train import assert_same_weights, train_losses, weights

CPU = torch.device("cpu")


def grpo_config(base: Path, files: list[str], out_dir: Path, **overrides) -> GRPOConfig:
    held = out_dir.parent / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in PAIRS[:4]))
    train = {"device": "cpu", "batch_size": 4, "max_steps": 30, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
             "eval_interval": 10, "eval_batches": 1, "checkpoint_interval": 10, "log_interval": 1,
             **overrides.pop("train", {})}
    return build_config(GRPOConfig, {"model": str(base), "data": {"train": files, "val": [str(held)]},
                                     "out_dir": str(out_dir), "group_size": 8, "max_new_tokens": 3,
                                     "rewards": [TOY_REWARD], "train": train, **overrides})


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in MetricsLog(run / "metrics.jsonl").read() if r["kind"] == kind]


# ---- advantages and the loss: worked numbers and TRL's own code -----------------------------------------------

def test_group_advantages_worked_numbers():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = (4 * 0.25 / 3) ** 0.5  # Bessel's correction: sqrt(sum (r - 0.5)^2 / (G - 1))
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4), torch.cat([expected, torch.zeros(4)]))
    assert torch.equal(group_advantages(rewards, 4, scale=False), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    trl_utils = pytest.importorskip("trl.trainer.utils")  # TRL's std of a group, as its trainer takes it
    grouped = rewards.view(-1, 4)
    trl = (grouped - grouped.mean(1, keepdim=True)) / (trl_utils.nanstd(grouped, dim=1).unsqueeze(1) + 1e-4)
    assert torch.allclose(group_advantages(rewards, 4), trl.reshape(-1))


def test_grpo_loss_worked_numbers():
    """Row 0 (A = 1): log-ratios 0.5 (ratio 1.6487, clipped to 1.2) and -0.1 (0.9048, inside). Row 1 (A = -1):
    log-ratio -0.5 (0.6065, below 0.8 so the clipped 0.8 * A binds) and a padding token."""
    old = torch.zeros(2, 2)
    logps = torch.tensor([[0.5, -0.1], [-0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    e = torch.exp(torch.tensor(-0.1)).item()
    per_token = [[-1.2, -e], [0.8]]
    loss, metrics = grpo_loss(logps, old, None, advantages, mask)
    assert loss.item() == pytest.approx(((per_token[0][0] + per_token[0][1]) / 2 + 0.8) / 2, abs=1e-6)
    assert grpo_loss(logps, old, None, advantages, mask, loss_type="bnpo")[0].item() == pytest.approx(
        (-1.2 - e + 0.8) / 3, abs=1e-6)
    assert grpo_loss(logps, old, None, advantages, mask, loss_type="dr_grpo", max_completion_length=4)[0].item() == \
        pytest.approx((-1.2 - e + 0.8) / (2 * 4), abs=1e-6)
    assert metrics["clip_ratio"].item() == pytest.approx(2 / 3) and "kl" not in metrics
    # beta: + beta * (exp(d) - d - 1) with d = ref - logp; d = 0.2 on every token
    ref = logps + 0.2
    k3 = torch.exp(torch.tensor(0.2)).item() - 0.2 - 1
    with_kl, metrics = grpo_loss(logps, old, ref, advantages, mask, beta=0.5)
    assert with_kl.item() == pytest.approx(loss.item() + 0.5 * k3, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(k3, abs=1e-6)
    # DAPO's clip-higher: with epsilon_high 0.7 the ratio 1.6487 is inside the range
    wide = grpo_loss(logps, old, None, advantages, mask, epsilon_high=0.7)[0]
    assert wide.item() == pytest.approx(((-torch.exp(torch.tensor(0.5)).item() - e) / 2 + 0.8) / 2, abs=1e-6)


def _trl_grpo_loss(logps, old, ref, advantages, mask, epsilon_low, epsilon_high, beta, loss_type, length):
    """TRL's GRPOTrainer._compute_loss on a stand-in trainer whose model returns `logps` for the completions."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    n, width = logps.shape
    logged: dict = defaultdict(lambda: defaultdict(list))
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=length, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=logged,
        accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t,
                                    reduce=lambda t, reduction: t, num_processes=1))
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.ones(n, width, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return GRPOTrainer._compute_loss(fake, None, inputs), logged["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_and_gradient_equal_trls(loss_type, beta):
    torch.manual_seed(0)
    logps = (-torch.rand(6, 5) * 3).requires_grad_()
    old, ref = logps.detach() + torch.randn(6, 5) * 0.3, logps.detach() + torch.randn(6, 5) * 0.5
    advantages, mask = torch.randn(6), torch.ones(6, 5)
    mask[1, 3:], mask[4, 1:] = 0, 0
    theirs, logged = _trl_grpo_loss(logps, old, ref, advantages, mask, 0.2, 0.28, beta, loss_type, 8)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    ours, metrics = grpo_loss(logps, old, ref, advantages, mask, 0.2, 0.28, beta, loss_type, 8)
    (our_grad,) = torch.autograd.grad(ours, logps)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(our_grad, their_grad, atol=1e-7)
    assert metrics["clip_ratio"].item() == pytest.approx(logged["clip_ratio/region_mean"][0])
    assert metrics["clip_ratio"].item() > 0
    if beta:
        assert metrics["kl"].item() == pytest.approx(logged["kl"][0])


# ---- rewards --------------------------------------------------------------------------------------------------

def test_rewards_by_name_and_by_path(toy_rewards):
    completions, answers = ["8", " 8 apples", "7 or 8", "-3", "+8", "eight"], ["8", "8", "8", "-3", "8", "8"]
    assert load_reward("arithmetic")([""] * 6, completions, answers) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert load_reward("format")([""] * 6, completions, answers) == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    near = ["1234", "84", "11284", "the answer is 1284.", "-1284", "x"]
    assert load_reward("digits")([""] * 6, near, ["1284"] * 6) == [0.75, 0.5, 0.8, 1.0, 0.0, 0.0]
    rewards = load_rewards(["arithmetic", TOY_REWARD], [1.0, 0.5])
    totals, each = score(rewards, [""] * 6, completions, answers)
    assert each[TOY_REWARD] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert totals == [1.0, 1.0, 0.0, 1.0, 1.0, 0.5]
    for bad, said in [("no_such_module_xyz:fn", "cannot import"), ("toy_rewards:missing", "no function"),
                      ("exactness", "not a built-in")]:
        with pytest.raises(ConfigError, match=said):
            load_reward(bad)
    with pytest.raises(ConfigError, match="2 weights for 1"):
        load_rewards(["format"], [1.0, 2.0])
    with pytest.raises(DataError, match="expected a list of 2"):
        score([("short", lambda p, c, a: [1.0], 1.0)], ["", ""], ["a", "b"], ["", ""])


@pytest.mark.parametrize("args, said", [
    (["--rewards", "no_such_module_xyz:score"], "no_such_module_xyz"),
    (["--train.parallel", "fsdp"], "fsdp"),
    (["--group_size", "1"], "group_size")])
def test_bad_rewards_and_settings_are_one_line_exit_2(base, prompts_file, tmp_path, capsys, args, said):
    assert main(["grpo", str(base), "--data.train", str(prompts_file), "--out_dir", str(tmp_path / "run"),
                 "--train.device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1


def test_bad_prompt_record_names_its_line(base, tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "2 + 3", "answer": "5"}) + "\n" + json.dumps({"question": "x"}) + "\n")
    assert main(["grpo", str(base), "--data.train", str(data), "--out_dir", str(tmp_path / "run"),
                 "--train.device", "cpu", "--rewards", "format"]) == 2
    assert f"{data}:2" in capsys.readouterr().err
    for record, said in (({"prompt": " ", "answer": "5"}, "empty prompt"),
                         ({"prompt": [{"role": "assistant", "content": "x"}]}, "must end with a user turn")):
        data.write_text(json.dumps(record) + "\n")
        assert main(["grpo", str(base), "--data.train", str(data), "--out_dir", str(tmp_path / "run"),
                     "--train.device", "cpu", "--rewards", "format"]) == 2
        err = capsys.readouterr().err
        assert f"{data}:1" in err and said in err


# ---- rollouts --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("peft", ["none", "prefix"])
def test_prefilled_once_rollout_equals_recomputing_every_sample(base, peft):
    """The prompt prefilled once and its cache repeated G times samples exactly what recomputing every sample's
    whole sequence at every step does with the same generator (prefix tuning: virtual tokens in the cache too)."""
    model, tokenizer = base_model(str(base), "grpo")
    if peft == "prefix":
        from lmforge.peft.config import PeftConfig
        from lmforge.peft.model import PeftModel

        torch.manual_seed(1)
        model = PeftModel(model, PeftConfig(method="prefix", virtual_tokens=3))
    model.eval()
    prompt = tokenizer.encode_chat([{"role": "user", "content": "the opposite of hot"}])
    cfg = GenerationConfig(max_new_tokens=6, temperature=1.3, top_k=50)
    rows = sample_group(model, prompt, 5, cfg, (), torch.Generator().manual_seed(3))
    generator, ids = torch.Generator().manual_seed(3), torch.tensor([prompt] * 5)
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, sample_next(model(ids)[:, -1], cfg, generator)[:, None]], dim=1)
    expected = ids[:, len(prompt):].tolist()
    assert rows == expected and len({tuple(r) for r in rows}) > 1
    stop = tuple({row[2] for row in expected})  # each row ends at its first token from this set
    cut = sample_group(model, prompt, 5, cfg, stop, torch.Generator().manual_seed(3))
    assert cut == [row[:next(i + 1 for i, t in enumerate(row) if t in stop)] for row in expected]


def _source(model, tokenizer, prompts, iterations: int) -> RolloutSource:
    toy = [("toy", lambda p, c, a: [float(len(x) % 3) for x in c], 1.0)]
    return RolloutSource(model, prompts, tokenizer, toy, GenerationConfig(max_new_tokens=3), 4, True, iterations,
                         grad_accum=2, seed=5)


def test_rollout_batches_serve_iterations_steps_and_resume_mid_cycle(base, tmp_path):
    model, tokenizer = base_model(str(base), "grpo")
    prompts, _ = tokenize_prompts([Prompt(q, [{"role": "user", "content": q}], a) for q, a in PAIRS], tokenizer,
                                  None, 60)
    source = _source(model, tokenizer, prompts, iterations=2)
    batches = [source.next_batch(2, 0, 1, CPU) for _ in range(6)]  # steps of 2 micro-batches: fresh, reused, fresh
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(batches[0], batches[2]) and same(batches[1], batches[3]) and not same(batches[0], batches[1])
    assert not same(batches[4], batches[0])
    first = batches[0]
    assert first["input_ids"].shape[0] == 2 * 4 and "ref_logps" not in first
    assert torch.allclose(first["advantages"].view(2, 4).sum(1), torch.zeros(2), atol=1e-5)
    completion = first["targets"] != -100
    assert torch.all(first["old_logps"][~completion] == 0) and torch.all(first["old_logps"][completion] < 0)

    again = _source(model, tokenizer, prompts, iterations=2)  # stopped after one step: mid-cycle
    for _ in range(2):
        again.next_batch(2, 0, 1, CPU)
    torch.save(again.state_dict(), tmp_path / "state.pt")
    with torch.no_grad():  # training moved the policy on: the saved batches must come back, not new samples
        for p in model.parameters():
            p.add_(0.05)
    resumed = _source(model, tokenizer, prompts, iterations=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert same(resumed.next_batch(2, 0, 1, CPU), batches[2]) and same(resumed.next_batch(2, 0, 1, CPU), batches[3])
    assert not same(resumed.next_batch(2, 0, 1, CPU), batches[4])  # fresh rollouts of the changed policy


# ---- the stage end to end -------------------------------------------------------------------------------------

def test_grpo_raises_the_reward(base, prompts_file, toy_rewards, tmp_path):
    run = grpo(grpo_config(base, [str(prompts_file)], tmp_path / "run"))
    train = records(run)
    early, late = [r["reward"] for r in train[:8]], [r["reward"] for r in train[-8:]]
    assert sum(late) / 8 > sum(early) / 8 + 0.15, (early, late)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_reward"] > summary["start_val_reward"] and summary["val_reward"] >= 0.75
    assert summary["reference_model"] is False and all("kl" not in r for r in train)
    assert abs(train[0]["loss"]) < 1e-6 and train[0]["ratio"] == pytest.approx(1.0)  # on-policy: mean A = 0
    training = json.loads((run / "final" / "training.json").read_text())
    assert training["stage"] == "grpo" and training["chat"] is True and training["rewards"] == [TOY_REWARD]


def test_beta_loads_a_reference_and_iterations_reuse_rollouts(base, prompts_file, toy_rewards, tmp_path):
    run = grpo(grpo_config(base, [str(prompts_file)], tmp_path / "run", beta=0.1, iterations=2, loss_type="bnpo",
                           train={"max_steps": 4, "checkpoint_interval": 0}))
    train = records(run)
    assert json.loads((run / "summary.json").read_text())["reference_model"] is True
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-7) and train[1]["kl"] > 0  # the policy starts as the reference
    assert train[1]["reward"] == train[0]["reward"] and train[3]["reward"] == train[2]["reward"]  # reused batches
    assert train[1]["ratio"] != pytest.approx(1.0, abs=1e-6)  # the second iteration is off-policy


def test_lora_run_through_the_cli(base, prompts_file, toy_rewards, tmp_path):
    out = tmp_path / "lora"
    assert main(["grpo", str(base), "--data.train", str(prompts_file), "--rewards", TOY_REWARD, "--out_dir", str(out),
                 "--peft.method", "lora", "--peft.r", "4", "--group_size", "4", "--max_new_tokens", "3",
                 "--loss_type", "dr_grpo", "--train.device", "cpu", "--train.batch_size", "2",
                 "--train.max_steps", "4", "--train.lr", "1e-2", "--train.log_interval", "1"]) == 0
    assert (out / "final" / "lmforge_adapter.json").is_file()
    assert json.loads((out / "final" / "training.json").read_text())["peft"] == "lora"
    assert len(records(out)) == 4


@pytest.mark.slow
def test_grpo_resume_after_sigkill_is_bit_exact(base, prompts_file, toy_rewards, tmp_path):
    """Killed after the checkpoint of step 3, in the middle of a rollout batch's two iterations."""
    settings = {"max_steps": 8, "checkpoint_interval": 3, "eval_interval": 4}
    cfg = grpo_config(base, [str(prompts_file)], tmp_path / "killed", iterations=2, train=settings)
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    kill_after_checkpoint("grpo", tmp_path / "config.json", tmp_path / "killed", step=3, delay=0.3,
                          pythonpath=(str(toy_rewards),))
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert not (tmp_path / "killed" / "final").exists() and checkpoint.name == "step_3"
    assert load_trainer_state(checkpoint)["sampler"]["reused"]  # the rollouts of step 3 serve step 4 too
    assert main(["grpo", "--config", str(tmp_path / "config.json"), "--resume"]) == 0
    full = grpo(grpo_config(base, [str(prompts_file)], tmp_path / "full", iterations=2, train=settings))
    assert_same_weights(weights(tmp_path / "killed"), weights(full))
    assert train_losses(tmp_path / "killed") == train_losses(full)
    assert [r["reward"] for r in records(tmp_path / "killed")] == [r["reward"] for r in records(full)]


@pytest.mark.slow
def test_grpo_under_ddp_matches_one_process_and_resumes_mid_cycle(base, prompts_file, toy_rewards, tmp_path):
    """Two processes (gloo) sample each prompt's group with the prompt's own generator: the same rollouts, the same
    loss and the same steps as one process, with grad_accum and reused rollout batches. Resumed from step 1, between
    the two iterations of a rollout batch, they finish as the uninterrupted run did."""
    settings = {"max_steps": 3, "batch_size": 4, "grad_accum": 2, "checkpoint_interval": 1, "keep_checkpoints": 0}
    two_cfg = grpo_config(base, [str(prompts_file)], tmp_path / "two", iterations=2, train=settings)
    (tmp_path / "two.json").write_text(json.dumps(config_to_dict(two_cfg)))
    run_on_two_processes("grpo", tmp_path / "two.json", pythonpath=(str(toy_rewards),))
    one = grpo(grpo_config(base, [str(prompts_file)], tmp_path / "one", iterations=2, train=settings))
    uninterrupted = weights(tmp_path / "two")
    assert_same_weights(uninterrupted, weights(one), atol=1e-5)
    two_losses, one_losses = train_losses(tmp_path / "two"), train_losses(one)
    assert all(abs(two_losses[k] - one_losses[k]) < 1e-5 for k in one_losses)

    for step in (2, 3):
        shutil.rmtree(tmp_path / "two" / "checkpoints" / f"step_{step}")
    assert len(load_trainer_state(latest_checkpoint(tmp_path / "two"))["sampler"]["reused"][0]) == 2  # both ranks'
    run_on_two_processes("grpo", tmp_path / "two.json", "--resume", pythonpath=(str(toy_rewards),))
    assert_same_weights(weights(tmp_path / "two"), uninterrupted)
    assert train_losses(tmp_path / "two") == two_losses
