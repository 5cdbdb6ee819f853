"""PPO: KL-penalized rewards, GAE, whitening and the clipped losses in worked numbers and against TRL's PPOTrainer
lines, the value head, the stage end to end (the reward rises, the KL to the reference grows from 0), PPO-ptx with a
reward model, early stop on target_kl, one-line errors, LoRA, exact resume after SIGKILL, DDP equal to one process."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import build_config, config_to_dict
from lmforge.convert import load
from lmforge.model.value import VALUE_HEAD_WEIGHTS, PolicyWithValue
from lmforge.objectives.ppo import gae, kl_penalized_rewards, ppo_loss, whiten
from lmforge.stages.config import PPOConfig
from lmforge.stages.ppo import ppo
from lmforge.train.checkpoint import latest_checkpoint, load_trainer_state
from lmforge.train.metrics import MetricsLog

from conftest import TOY_REWARD, kill_after_checkpoint, run_on_two_processes
from test_sft import PAIRS
from test_train import assert_same_weights, train_losses, weights


@pytest.fixture(scope="module")
def ptx_data(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, base: Path) -> Path:
    """A dataset dir of the fixture corpus, tokenized with the policy's tokenizer."""
    out = tmp_path_factory.mktemp("ptx") / "data"
    assert main(["data", "prepare", "--sources", str(corpus_dir), "--tokenizer", str(base), "--out_dir", str(out),
                 "--num_workers", "1", "--val_fraction", "0.1"]) == 0
    return out


def reward_model_dir(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A reward model dir (as lmforge reward writes) on `model_dir`'s model, with a random head."""
    from lmforge.model.heads import TaskHeadModel
    from lmforge.tokenizer import Tokenizer

    torch.manual_seed(seed)
    TaskHeadModel(load(model_dir), "reward", ["reward"]).save(out)
    Tokenizer.load(model_dir).save(out)
    return out


def ppo_config(base: Path, files: list[str], out_dir: Path, **overrides) -> PPOConfig:
    held = out_dir.parent / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in PAIRS[:4]))
    train = {"device": "cpu", "batch_size": 4, "max_steps": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
             "eval_interval": 4, "eval_batches": 1, "checkpoint_interval": 0, "log_interval": 1,
             **overrides.pop("train", {})}
    return build_config(PPOConfig, {"model": str(base), "data": {"train": files, "val": [str(held)]},
                                    "out_dir": str(out_dir), "max_new_tokens": 3, "rewards": [TOY_REWARD],
                                    "num_minibatches": 2, "ppo_epochs": 2, "train": train, **overrides})


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in MetricsLog(run / "metrics.jsonl").read() if r["kind"] == kind]


# ---- rewards, GAE, whitening and the loss: worked numbers ----------------------------------------------------

MASK = torch.tensor([[True, True, True, False], [False, True, False, False]])  # row 1: a prompt position first


def test_kl_penalized_rewards_worked_numbers():
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [0.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.25, 0.0], [0.0, -0.5, 0.0, 0.0]])
    rewards = kl_penalized_rewards(torch.tensor([1.0, -2.0]), logps, ref, MASK, kl_coef=0.1)
    # -0.1 * (0.5, 0, -0.25) with the score 1.0 on the last token; -0.1 * -0.5 + (-2.0) on row 1's only token
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 1.025, 0.0], [0.0, -1.95, 0.0, 0.0]]))


def test_gae_worked_numbers():
    """gamma 0.9, lam 0.8 (gamma * lam = 0.72); padding and prompt positions hold junk that must not count.
    Row 0: delta_2 = 1 + 0.9 * 0 - 0.3 = 0.7 (no value after the last token), delta_1 = -0.2 + 0.9 * 0.3 - 0.4
    = -0.33, delta_0 = 0.1 + 0.9 * 0.4 - 0.5 = -0.04; A_1 = -0.33 + 0.72 * 0.7 = 0.174, A_0 = -0.04 + 0.72 * 0.174."""
    rewards = torch.tensor([[0.1, -0.2, 1.0, 9.0], [5.0, 2.0, 0.0, 3.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0], [3.0, 0.5, 6.0, 1.0]])
    advantages, returns = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    a0 = -0.04 + 0.72 * 0.174
    assert torch.allclose(advantages, torch.tensor([[a0, 0.174, 0.7, 0.0], [0.0, 1.5, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[a0 + 0.5, 0.574, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]]), atol=1e-6)
    # gamma = lam = 1 with zero values: every token's advantage is the sum of the rewards from it on
    advantages, _ = gae(rewards, torch.zeros_like(values), MASK, 1.0, 1.0)
    assert torch.allclose(advantages[0, :3], torch.tensor([0.9, 0.8, 1.0]))


def test_whiten_worked_numbers():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [50.0, 2.0, -7.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [False, True, False, False]])
    # masked values 1, 2, 3, 2: mean 2, variance (1 + 0 + 1 + 0) / 3 with Bessel's correction
    scale = 1 / math.sqrt(2 / 3 + 1e-8)
    assert torch.allclose(whiten(x, mask), torch.tensor([[-scale, 0, scale, 0], [0, 0, 0, 0]]), atol=1e-6)


def test_ppo_loss_worked_numbers():
    """Row 0 (A = 1): log-ratios 0.5 (ratio 1.6487, clipped to 1.2) and -0.1 (0.9048, inside); row 1 (A = -1):
    -0.5 (0.6065: the clipped 0.8 binds) and a padding token. Values clip at +-0.2 around the old ones."""
    mask = torch.tensor([[True, True], [True, False]])
    old = torch.zeros(2, 2)
    logps = torch.tensor([[0.5, -0.1], [-0.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    values, old_values = torch.tensor([[0.5, 0.0], [1.0, 9.0]]), torch.tensor([[0.2, 0.1], [0.9, 0.0]])
    returns = torch.tensor([[1.0, -0.5], [0.0, 0.0]])
    loss, metrics = ppo_loss(logps, old, advantages, values, old_values, returns, mask, 0.2, 0.2, vf_coef=0.1)
    e = math.exp(-0.1)
    policy = (-1.2 - e + 0.8) / 3
    value = 0.5 * ((0.4 - 1.0) ** 2 + (0.0 + 0.5) ** 2 + (1.0 - 0.0) ** 2) / 3  # v = 0.5 clipped to 0.4 binds
    assert metrics["policy_loss"].item() == pytest.approx(policy, abs=1e-6)
    assert metrics["value_loss"].item() == pytest.approx(value, abs=1e-6)
    assert loss.item() == pytest.approx(policy + 0.1 * value, abs=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 3)
    assert metrics["value_clipfrac"].item() == pytest.approx(1 / 3)
    assert metrics["approx_kl"].item() == pytest.approx(0.5 * (0.25 + 0.01 + 0.25) / 3, abs=1e-7)


# ---- the same against TRL's PPOTrainer (trl/trainer/ppo_trainer.py, TRL 0.12 to 0.2x; TRL 1.x has no PPO) -----
# TRL 1.16 (the installed one) dropped its PPOTrainer, so its lines are transcribed here, line for line: the GAE
# loop and masked_whiten of its `train` (with masked_mean / masked_var of trl.trainer.utils), and the loss of a
# micro-batch. Right-padded responses, padding_mask True on the padding.

def _trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _trl_masked_whiten(values, mask):
    mean = _trl_masked_mean(values, mask)
    variance = _trl_masked_mean((values - mean) ** 2, mask)
    variance = variance * (mask.sum() / (mask.sum() - 1))
    return (values - mean) * torch.rsqrt(variance + 1e-8)


def _trl_advantages(rewards, values, padding_mask, gamma, lam):
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, ~padding_mask)
    return torch.masked_fill(advantages, padding_mask, 0), returns


def _trl_loss(new_logprobs, mb_logprobs, mb_advantage, vpred, mb_values, mb_return, padding_mask, cliprange,
              cliprange_value, vf_coef):
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss = 0.5 * _trl_masked_mean(torch.max(vf_losses1, vf_losses2), ~padding_mask)
    vf_clipfrac = _trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask)
    ratio = torch.exp(new_logprobs - mb_logprobs)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = _trl_masked_mean(torch.max(pg_losses, pg_losses2), ~padding_mask)
    pg_clipfrac = _trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, pg_clipfrac, vf_clipfrac


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_whitening_and_loss_equal_trls_lines(gamma, lam):
    torch.manual_seed(0)
    lengths = torch.tensor([6, 2, 4, 1, 5])
    padding_mask = torch.arange(6)[None, :] >= lengths[:, None]  # (5, 6)
    mask = ~padding_mask
    logps, ref = -torch.rand(5, 6) * 3, -torch.rand(5, 6) * 3
    values = torch.randn(5, 6).masked_fill(padding_mask, 0)  # TRL zeroes the values on the padding
    scores = torch.randn(5)
    rewards = kl_penalized_rewards(scores, logps, ref, mask, 0.05)
    theirs, their_returns = _trl_advantages(rewards, values, padding_mask, gamma, lam)
    ours, returns = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(whiten(ours, mask), theirs, atol=1e-6)
    assert torch.allclose(returns, their_returns.masked_fill(padding_mask, 0), atol=1e-6)

    new = (logps + torch.randn(5, 6) * 0.3).requires_grad_()
    vpred = (values + torch.randn(5, 6) * 0.4).requires_grad_()
    their_loss, pg, vf, pg_clip, vf_clip = _trl_loss(new, logps, theirs, vpred, values, their_returns, padding_mask,
                                                     0.2, 0.2, 0.1)
    their_grads = torch.autograd.grad(their_loss, (new, vpred))
    loss, metrics = ppo_loss(new, logps, theirs, vpred, values, their_returns, mask, 0.2, 0.2, 0.1)
    grads = torch.autograd.grad(loss, (new, vpred))
    assert loss.item() == pytest.approx(their_loss.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads, their_grads))
    assert metrics["policy_loss"].item() == pytest.approx(pg.item(), abs=1e-6)
    assert metrics["value_loss"].item() == pytest.approx(vf.item(), abs=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(pg_clip.item()) and pg_clip > 0
    assert metrics["value_clipfrac"].item() == pytest.approx(vf_clip.item()) and vf_clip > 0


# ---- the value head -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("peft", ["none", "lora"])
def test_value_head_keeps_the_log_probs_and_saves_apart(base, tmp_path, peft):
    lm = load(base)
    if peft == "lora":
        from lmforge.peft.config import PeftConfig
        from lmforge.peft.files import wrap_base

        lm = wrap_base(lm, PeftConfig(method="lora", r=4), str(base))
    model = PolicyWithValue(lm).eval()
    ids = torch.randint(0, lm.config.vocab_size, (3, 10))
    targets = ids.roll(-1, dims=1).masked_fill(torch.arange(10) < 4, -100)
    with torch.no_grad():
        logps, values, lm_loss = model(ids, targets=targets, lm_ids=ids, lm_targets=ids)
        assert torch.equal(logps, lm(ids, targets=targets, per_token=True))
        assert torch.equal(values, torch.zeros(3, 10)) and lm_loss.item() == pytest.approx(lm(ids, targets=ids).item())
        torch.nn.init.normal_(model.value_head.weight)
        model.value_head.bias.fill_(0.3)
        hidden = lm.hidden_states(ids)
        assert torch.allclose(model(ids, targets=targets)[1], hidden @ model.value_head.weight[0] + 0.3, atol=1e-5)
        assert model(ids).shape == (3, 10, lm.config.vocab_size)  # a bare call: the logits
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / VALUE_HEAD_WEIGHTS).is_file()
    again = PolicyWithValue(load(base) if peft == "none" else wrap_base(load(base), PeftConfig(method="lora", r=4),
                                                                      str(base)))
    assert again.saved_mismatch(tmp_path / "saved") is None
    again.load_saved(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    from lmforge.tokenizer import Tokenizer

    Tokenizer.load(base).save(tmp_path / "saved")
    plain = load(tmp_path / "saved")  # a model (or adapter) dir like any other: the value head files are ignored
    with torch.no_grad():
        assert torch.equal(plain(ids), lm(ids))
    if peft == "none":
        assert "value_head" in PolicyWithValue(load(base)).saved_mismatch(base)


# ---- the stage end to end -------------------------------------------------------------------------------------

def test_ppo_raises_the_reward_and_the_kl_to_the_reference_grows(base, prompts_file, toy_rewards, tmp_path):
    cfg = ppo_config(base, [str(prompts_file)], tmp_path / "run",
                     train={"batch_size": 16, "max_steps": 30, "lr": 3e-2, "min_lr": 3e-3, "eval_interval": 10})
    run = ppo(cfg)
    train = records(run)
    early, late = [r["reward"] for r in train[:8]], [r["reward"] for r in train[-8:]]
    assert sum(late) / 8 > sum(early) / 8 + 0.15, (early, late)
    assert [r["ppo_epoch"] for r in train[:8]] == [0, 0, 1, 1] * 2  # 2 epochs of 2 minibatches per rollout batch
    first = train[0]  # the first minibatch is on-policy, and the policy is the reference
    assert first["kl"] == 0 and first["approx_kl"] < 1e-9 and first["clipfrac"] == 0
    assert train[2]["approx_kl"] > 0 and any(r["kl"] != 0 for r in train)
    summary = json.loads((run / "summary.json").read_text())
    vals = records(run, "val")
    assert summary["start_val_kl"] == 0 and 0 < vals[0]["val_kl"] < vals[-1]["val_kl"]
    assert summary["val_reward"] > summary["start_val_reward"] and summary["reference_model"] is True
    assert summary["val_loss"] == pytest.approx(-(summary["val_reward"] - 0.05 * summary["val_kl"]), abs=1e-5)
    final = run / "final"
    training = json.loads((final / "training.json").read_text())
    assert training["stage"] == "ppo" and training["chat"] is True and training["rewards"] == [TOY_REWARD]
    from lmforge.convert import load_with_tokenizer

    model, tokenizer = load_with_tokenizer(final)  # the final dir chats like any model dir
    reply = model.generate([tokenizer.encode_chat([{"role": "user", "content": "2 + 3"}])], tokenizer=tokenizer)
    assert isinstance(reply[0].text, str)


def test_ppo_ptx_with_a_reward_model_and_no_reference(base, prompts_file, toy_rewards, ptx_data, tmp_path):
    """kl_coef 0: no reference model; the reward model's score plus a weighted verifiable reward; PPO-ptx."""
    rm = reward_model_dir(base, tmp_path / "rm")
    run = ppo(ppo_config(base, [str(prompts_file)], tmp_path / "run", reward_model=str(rm), reward_weights=[0.5],
                         kl_coef=0.0, ptx_coef=0.5, ptx_data=str(ptx_data), train={"max_steps": 4}))
    train, vals = records(run), records(run, "val")
    assert all(4 < r["ptx_loss"] < 7 for r in train)  # about ln(320) for a random model
    assert all(r["kl"] == 0 for r in train)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reference_model"] is False and "val_kl" not in summary and "start_val_kl" not in summary
    assert summary["val_reward"] == pytest.approx(summary["val_reward_model"] + 0.5 * summary[
        f"val_reward_{TOY_REWARD}"], abs=1e-5)
    assert vals[-1]["val_loss"] == pytest.approx(-vals[-1]["val_reward"], abs=1e-5)


def test_target_kl_skips_the_remaining_epochs(base, prompts_file, toy_rewards, tmp_path):
    settings = {"ppo_epochs": 3, "train": {"max_steps": 6, "eval_interval": 0}}
    full = records(ppo(ppo_config(base, [str(prompts_file)], tmp_path / "full", **settings)))
    assert [r["ppo_epoch"] for r in full] == [0, 0, 1, 1, 2, 2]
    stopped = records(ppo(ppo_config(base, [str(prompts_file)], tmp_path / "stopped", target_kl=1e-9, **settings)))
    assert [r["ppo_epoch"] for r in stopped] == [0] * 6  # after each first epoch: a fresh rollout batch
    assert [r["reward"] for r in stopped[:2]] == [r["reward"] for r in full[:2]]  # the same first rollouts
    assert stopped[2]["approx_kl"] < 1e-9 < full[2]["approx_kl"]


def test_builtin_prompts_are_the_preference_questions_with_their_answers(tmp_path):
    from lmforge.objectives.rewards import load_reward
    from lmforge.stages.config import PromptDataSection
    from lmforge.stages.ppo import preference_prompts
    from lmforge.stages.rollouts import load_prompts

    data = PromptDataSection(builtin_tasks=["arithmetic_pref"], per_task_limit=5, cache_dir=str(tmp_path))
    train, val = load_prompts(data, builtin=preference_prompts)
    assert len(train) == 5 and val and all(p.text.startswith("What is") for p in train + val)
    answers = [p.answer for p in train]
    assert load_reward("arithmetic")([p.text for p in train], answers, answers) == [1.0] * 5


@pytest.mark.parametrize("args, said", [
    ([], "needs a reward"),
    (["--rewards", "format", "--ptx_coef", "0.5"], "ptx_data"),
    (["--rewards", "format", "--train.parallel", "fsdp"], "fsdp"),
    (["--reward_model", "OTHER"], "another tokenizer")])
def test_bad_settings_are_one_line_exit_2(base, model_dir, prompts_file, tmp_path, capsys, args, said):
    if "OTHER" in args:
        args = ["--reward_model", str(reward_model_dir(model_dir, tmp_path / "other_rm"))]
    assert main(["ppo", str(base), "--data.train", str(prompts_file), "--out_dir", str(tmp_path / "run"),
                 "--train.device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1, err
    if "another tokenizer" in said:
        assert str(base) in err and str(tmp_path / "other_rm") in err


def test_lora_run_through_the_cli(base, prompts_file, toy_rewards, tmp_path):
    out = tmp_path / "lora"
    assert main(["ppo", str(base), "--data.train", str(prompts_file), "--rewards", TOY_REWARD, "--out_dir", str(out),
                 "--peft.method", "lora", "--peft.r", "4", "--max_new_tokens", "3", "--num_minibatches", "2",
                 "--ppo_epochs", "1", "--train.device", "cpu", "--train.batch_size", "2", "--train.max_steps", "4",
                 "--train.lr", "1e-2", "--train.log_interval", "1"]) == 0
    final = out / "final"
    assert (final / "lmforge_adapter.json").is_file() and (final / VALUE_HEAD_WEIGHTS).is_file()
    assert json.loads((final / "training.json").read_text())["peft"] == "lora"
    assert len(records(out)) == 4 and type(load(final)).__name__ == "PeftModel"


# ---- exact resume and DDP -------------------------------------------------------------------------------------

def value_heads(run: Path) -> dict:
    return load_file(str(run / "final" / VALUE_HEAD_WEIGHTS))


@pytest.mark.slow
def test_ppo_resume_after_sigkill_is_bit_exact(base, prompts_file, toy_rewards, ptx_data, tmp_path):
    """Killed after the checkpoint of step 3, in the second epoch of a rollout batch, with PPO-ptx."""
    settings = {"ptx_coef": 0.2, "ptx_data": str(ptx_data),
                "train": {"max_steps": 7, "checkpoint_interval": 3, "eval_interval": 4}}
    cfg = ppo_config(base, [str(prompts_file)], tmp_path / "killed", **settings)
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    kill_after_checkpoint("ppo", tmp_path / "config.json", tmp_path / "killed", step=3, delay=0.3,
                          pythonpath=(str(toy_rewards),))
    checkpoint = latest_checkpoint(tmp_path / "killed")
    assert not (tmp_path / "killed" / "final").exists() and checkpoint.name == "step_3"
    sampler = load_trainer_state(checkpoint)["sampler"]
    assert sampler["table"] is not None and sampler["served"] == 3  # the rollout batch of steps 1-4, in use
    assert (checkpoint / VALUE_HEAD_WEIGHTS).is_file()
    assert main(["ppo", "--config", str(tmp_path / "config.json"), "--resume"]) == 0
    full = ppo(ppo_config(base, [str(prompts_file)], tmp_path / "full", **settings))
    assert_same_weights(weights(tmp_path / "killed"), weights(full))
    assert_same_weights(value_heads(tmp_path / "killed"), value_heads(full))
    assert train_losses(tmp_path / "killed") == train_losses(full)
    assert [r["reward"] for r in records(tmp_path / "killed")] == [r["reward"] for r in records(full)]


@pytest.mark.slow
def test_ppo_under_ddp_matches_one_process_and_resumes_mid_rollout(base, prompts_file, toy_rewards, ptx_data,
                                                                   tmp_path):
    """Two processes (gloo), each sampling half of every rollout batch with the prompts' own generators, take the
    same steps as one process (grad_accum 2, PPO-ptx). Resumed from step 1, inside a rollout batch, they finish as
    the uninterrupted run did."""
    settings = {"ptx_coef": 0.2, "ptx_data": str(ptx_data),
                "train": {"max_steps": 3, "grad_accum": 2, "checkpoint_interval": 1, "keep_checkpoints": 0,
                          "eval_interval": 0}}
    two_cfg = ppo_config(base, [str(prompts_file)], tmp_path / "two", **settings)
    (tmp_path / "two.json").write_text(json.dumps(config_to_dict(two_cfg)))
    run_on_two_processes("ppo", tmp_path / "two.json", pythonpath=(str(toy_rewards),))
    one = ppo(ppo_config(base, [str(prompts_file)], tmp_path / "one", **settings))
    uninterrupted, heads = weights(tmp_path / "two"), value_heads(tmp_path / "two")
    assert_same_weights(uninterrupted, weights(one), atol=1e-5)
    assert_same_weights(heads, value_heads(one), atol=1e-5)
    two_losses, one_losses = train_losses(tmp_path / "two"), train_losses(one)
    assert all(abs(two_losses[k] - one_losses[k]) < 1e-5 for k in one_losses)

    for step in (2, 3):
        shutil.rmtree(tmp_path / "two" / "checkpoints" / f"step_{step}")
    assert load_trainer_state(latest_checkpoint(tmp_path / "two"))["sampler"]["table"] is not None
    run_on_two_processes("ppo", tmp_path / "two.json", "--resume", pythonpath=(str(toy_rewards),))
    assert_same_weights(weights(tmp_path / "two"), uninterrupted)
    assert train_losses(tmp_path / "two") == two_losses
