"""Configs of the post-training stages, in a module without torch (the CLI builds its options from them).

Every stage config has a `train` section: the one loop's TrainConfig (lmforge.train.config), with defaults that
suit the stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from lmforge.peft.config import PeftConfig
from lmforge.train.config import TrainConfig


def _sft_train() -> TrainConfig:
    return TrainConfig(batch_size=16, max_steps=500, lr=3e-4, min_lr=3e-5, weight_decay=0.0, eval_interval=100,
                       eval_batches=20, checkpoint_interval=250, log_interval=10)


@dataclass
class SFTDataSection:
    train: list[str] = field(default_factory=lambda: ["builtin"])  # JSONL files (alpaca, messages, sharegpt,
                                                                   # prompt/completion), or builtin: the built-in
                                                                   # task instructions (lmforge tasks list)
    val: list[str] = field(default_factory=list)  # held-out JSONL files; empty: val_fraction of the train files
                                                  # (builtin: its validation split)
    val_fraction: float = 0.05  # conversations held out (by a hash of their text) when no val files are given
    format: Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion"] = "auto"  # auto: by each line
    builtin_tasks: list[str] = field(default_factory=list)  # built-in tasks taken by builtin (empty: all)
    per_task_limit: int = 0  # builtin: at most this many training examples per task (0 = all)
    seq_len: Optional[int] = None  # tokens per row; None -> the model's block_size
    packing: bool = True  # several conversations per row (attention never crosses them); false: one per padded row
    truncation: Literal["truncate", "drop", "error"] = "truncate"  # a conversation over seq_len + 1 tokens: cut at
                                                                   # the end, left out, or an error naming it
    train_on: Literal["assistant", "all"] = "assistant"  # loss on every assistant turn's tokens, or on all tokens
    system_prompt: Optional[str] = None  # a system turn added to conversations that have none
    cache_dir: Optional[str] = None  # built-in corpus and task cache; None = $LMFORGE_CACHE or ~/.cache/lmforge


@dataclass
class SFTConfig:
    model: str = ""  # the base model dir (lmforge or Hugging Face), with its tokenizer
    data: SFTDataSection = field(default_factory=SFTDataSection)
    peft: PeftConfig = field(default_factory=PeftConfig)  # method none = full fine-tuning
    train: TrainConfig = field(default_factory=_sft_train)
    out_dir: str = "runs/sft"  # the run dir; the chat model is written to OUT_DIR/final
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)


def _finetune_train() -> TrainConfig:
    return TrainConfig(batch_size=16, max_steps=500, lr=3e-4, min_lr=3e-5, weight_decay=0.0, eval_interval=100,
                       eval_batches=20, checkpoint_interval=250, log_interval=10)


@dataclass
class FinetuneDataSection:
    train: list[str] = field(default_factory=lambda: ["builtin"])  # JSONL files, or builtin: the built-in nli
                                                                   # (entailment), mc_define (multiple_choice)
                                                                   # or prompt-injection set (classify)
    val: list[str] = field(default_factory=list)  # held-out JSONL files; empty: val_fraction of the train files
                                                  # (builtin: its validation split)
    val_fraction: float = 0.05  # items held out (by a hash of their text) when no val files are given
    max_examples: int = 0  # at most this many training items (0 = all)
    seq_len: Optional[int] = None  # tokens per sequence at most; None -> the model's block_size
    cache_dir: Optional[str] = None  # built-in task cache; None = $LMFORGE_CACHE or ~/.cache/lmforge


@dataclass
class FinetuneConfig:
    model: str = ""  # the base model dir (lmforge or Hugging Face), with its tokenizer
    task: Literal["classify", "entailment", "similarity", "multiple_choice"] = "entailment"  # GPT-1's input
                                                                   # transformations and head
    lm_weight: float = 0.5  # lambda of L3 = L2 + lambda * L1 (the auxiliary language-modelling loss); 0 = off
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    peft: PeftConfig = field(default_factory=PeftConfig)  # method none = full fine-tuning
    train: TrainConfig = field(default_factory=_finetune_train)
    out_dir: str = "runs/finetune"  # the run dir; the model with its head is written to OUT_DIR/final
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)


def _preference_train() -> TrainConfig:
    return TrainConfig(batch_size=16, max_steps=300, lr=1e-5, min_lr=1e-6, weight_decay=0.0, eval_interval=50,
                       eval_batches=20, checkpoint_interval=100, log_interval=10)


@dataclass
class PreferenceDataSection:
    train: list[str] = field(default_factory=lambda: ["builtin"])  # JSONL files of {prompt, chosen, rejected} or
                                                                   # {prompt, responses: [best, ..., worst]}, or
                                                                   # builtin: the built-in preference sets
    val: list[str] = field(default_factory=list)  # held-out JSONL files; empty: val_fraction of the train files
                                                  # (builtin: its validation split)
    val_fraction: float = 0.05  # prompts held out (by a hash of their text) when no val files are given
    builtin_tasks: list[str] = field(default_factory=list)  # built-in preference sets taken by builtin (empty:
                                                            # define_pref, translate_pref, arithmetic_pref)
    per_task_limit: int = 0  # builtin: at most this many training items per set (0 = all)
    seq_len: Optional[int] = None  # tokens per prompt + response at most; None -> the model's block_size
    truncation: Literal["truncate", "drop", "error"] = "truncate"  # prompt + response over seq_len + 1 tokens:
                                                                   # cut at the end, left out, or an error
    system_prompt: Optional[str] = None  # a system turn added to prompts that have none
    cache_dir: Optional[str] = None  # built-in corpus and task cache; None = $LMFORGE_CACHE or ~/.cache/lmforge


@dataclass
class RewardConfig:
    model: str = ""  # the model dir the reward model starts from (usually the SFT model), with its tokenizer
    data: PreferenceDataSection = field(default_factory=PreferenceDataSection)
    center_coefficient: float = 0.0  # reward centering: + c * mean((r_w + r_l)^2) (TRL's center_rewards_coefficient)
    peft: PeftConfig = field(default_factory=PeftConfig)  # method none = full fine-tuning
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(_preference_train(), lr=5e-5,
                                                                           min_lr=5e-6))
    out_dir: str = "runs/reward"  # the run dir; the reward model is written to OUT_DIR/final
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)


@dataclass
class RewardScoreConfig:
    model: str = ""  # a reward model dir (lmforge reward's OUT_DIR/final)
    prompt: list[str] = field(default_factory=list)  # prompts: one for all responses, or one per response
    response: list[str] = field(default_factory=list)  # responses to score
    file: str = ""  # or a preference JSONL file: every response of every record is scored, and pair accuracy given
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    batch_size: int = 16  # sequences per forward pass
    out: str = ""  # write the scores as JSON here (optional)


@dataclass
class DPOConfig:
    model: str = ""  # the policy's starting model dir (usually the SFT model), with its tokenizer
    reference: str = ""  # the reference model dir; empty: the starting model (a PEFT run: its base)
    reference_mode: Literal["precompute", "live"] = "precompute"  # reference log-probs computed once before
                                                                  # training (no second model in memory), or live
    beta: float = 0.1  # strength of the implicit KL constraint (IPO: its tau)
    loss_type: Literal["sigmoid", "ipo", "robust", "hinge"] = "sigmoid"  # DPO, IPO, robust DPO, SLiC hinge
    label_smoothing: float = 0.0  # sigmoid: conservative DPO's label noise e; robust: the assumed noise, < 0.5
    data: PreferenceDataSection = field(default_factory=PreferenceDataSection)
    peft: PeftConfig = field(default_factory=PeftConfig)  # method none = full fine-tuning
    train: TrainConfig = field(default_factory=_preference_train)
    out_dir: str = "runs/dpo"  # the run dir; the aligned model is written to OUT_DIR/final
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)


def _grpo_train() -> TrainConfig:
    return TrainConfig(batch_size=8, max_steps=200, lr=1e-5, min_lr=1e-6, warmup_steps=10, weight_decay=0.0,
                       eval_interval=50, eval_batches=4, checkpoint_interval=50, log_interval=5)


@dataclass
class GRPODataSection:
    train: list[str] = field(default_factory=lambda: ["builtin"])  # JSONL files of {"prompt": text or messages,
                                                                   # "answer": text}, or builtin: the built-in
                                                                   # arithmetic task's train split
    val: list[str] = field(default_factory=list)  # held-out JSONL files; empty: val_fraction of the train files
                                                  # (builtin: its validation split)
    val_fraction: float = 0.05  # prompts held out (by a hash of their text) when no val files are given
    per_task_limit: int = 0  # builtin: at most this many training prompts (0 = all)
    system_prompt: Optional[str] = None  # a system turn added to prompts that have none
    cache_dir: Optional[str] = None  # built-in task cache; None = $LMFORGE_CACHE or ~/.cache/lmforge


@dataclass
class GRPOConfig:
    model: str = ""  # the policy's starting model dir (usually the SFT model), with its tokenizer
    data: GRPODataSection = field(default_factory=GRPODataSection)
    group_size: int = 8  # G: completions sampled per prompt; advantages are relative to the group
    max_new_tokens: int = 16  # tokens per completion at most (also dr_grpo's max_completion_length)
    temperature: float = 1.0  # sampling temperature of the rollouts (> 0); the loss uses the policy's
                              # log-probabilities at temperature 1 (TRL's divide the logits by it)
    top_p: float = 1.0  # nucleus sampling of the rollouts; 1.0 = off
    top_k: int = 0  # keep the k most likely tokens in the rollouts; 0 = off
    beta: float = 0.0  # KL penalty towards the starting model (k3 estimator); 0: no reference model is loaded
    epsilon: float = 0.2  # clip range of the probability ratio: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # upper clip; None -> epsilon (DAPO's clip-higher uses 0.28)
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"  # grpo: each sequence's token mean, then the mean
                                                            # over sequences; bnpo: the mean over all tokens;
                                                            # dr_grpo: sum / (sequences * max_new_tokens)
    scale_rewards: bool = True  # divide advantages by the group's reward std (false: Dr. GRPO's unscaled form)
    iterations: int = 1  # mu: optimizer steps on each rollout batch (old log-probs fixed at rollout time)
    rewards: list[str] = field(default_factory=lambda: ["arithmetic"])  # built-in names (arithmetic, format,
                                                                        # digits) or module:function paths
    reward_weights: list[float] = field(default_factory=list)  # one weight per reward; empty: 1.0 each
    peft: PeftConfig = field(default_factory=PeftConfig)  # method none = full fine-tuning
    train: TrainConfig = field(default_factory=_grpo_train)  # batch_size: prompts per micro-step (x group_size
                                                             # completions)
    out_dir: str = "runs/grpo"  # the run dir; the trained policy is written to OUT_DIR/final
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)


def _ppo_train() -> TrainConfig:
    return TrainConfig(batch_size=8, max_steps=200, lr=1e-5, min_lr=1e-6, warmup_steps=10, weight_decay=0.0,
                       eval_interval=50, eval_batches=4, checkpoint_interval=50, log_interval=5)


@dataclass
class PromptDataSection:
    train: list[str] = field(default_factory=lambda: ["builtin"])  # JSONL files of {"prompt": text or messages,
                                                                   # "answer": text (optional)}, or builtin: the
                                                                   # questions of the built-in preference sets
    val: list[str] = field(default_factory=list)  # held-out JSONL files; empty: val_fraction of the train files
                                                  # (builtin: the validation split)
    val_fraction: float = 0.05  # prompts held out (by a hash of their text) when no val files are given
    builtin_tasks: list[str] = field(default_factory=list)  # built-in tasks whose questions builtin takes (empty:
                                                            # define_pref, translate_pref, arithmetic_pref)
    per_task_limit: int = 0  # builtin: at most this many training prompts per task (0 = all)
    system_prompt: Optional[str] = None  # a system turn added to prompts that have none
    cache_dir: Optional[str] = None  # built-in task cache; None = $LMFORGE_CACHE or ~/.cache/lmforge


@dataclass
class PPOConfig:
    model: str = ""  # the policy's starting model dir (usually the SFT model), with its tokenizer; also the
                     # frozen reference of the KL penalty
    reward_model: str = ""  # a reward model dir (lmforge reward); its tokenizer must be the policy's
    rewards: list[str] = field(default_factory=list)  # verifiable rewards added to the reward model's score
                                                      # (built-in names or module:function, as grpo); with no
                                                      # reward_model, the only reward
    reward_weights: list[float] = field(default_factory=list)  # one weight per reward; empty: 1.0 each
    data: PromptDataSection = field(default_factory=PromptDataSection)
    max_new_tokens: int = 24  # tokens per response at most
    temperature: float = 1.0  # sampling temperature of the rollouts (> 0)
    top_p: float = 1.0  # nucleus sampling of the rollouts; 1.0 = off
    top_k: int = 0  # keep the k most likely tokens in the rollouts; 0 = off
    kl_coef: float = 0.05  # beta of the per-token KL penalty beta * (log pi - log pi_ref) folded into the reward
    gamma: float = 1.0  # discount of GAE
    lam: float = 0.95  # lambda of GAE
    whiten_advantages: bool = True  # advantages normalized to zero mean and unit variance over the rollout batch
    cliprange: float = 0.2  # clip of the policy ratio
    cliprange_value: float = 0.2  # clip of the value prediction around its rollout-time value
    vf_coef: float = 0.1  # weight of the value loss
    ppo_epochs: int = 4  # passes over each rollout batch
    num_minibatches: int = 4  # optimizer steps per pass: the rollout batch is batch_size x num_minibatches prompts
    target_kl: float = 0.0  # early stop: the rest of a rollout batch's epochs is skipped when the approximate KL
                            # to the rollout policy exceeds this (0 = never)
    ptx_coef: float = 0.0  # PPO-ptx: gamma_ptx times the LM loss on pretraining batches, added to the objective
    ptx_data: str = ""  # PPO-ptx: a dataset dir (lmforge data prepare) of the pretraining distribution
    peft: PeftConfig = field(default_factory=PeftConfig)  # method none = full fine-tuning
    train: TrainConfig = field(default_factory=_ppo_train)  # batch_size: prompts per minibatch (one step)
    out_dir: str = "runs/ppo"  # the run dir; the trained policy is written to OUT_DIR/final
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)


DEFAULT_RUBRIC = ("You judge answers to a question. The better answer is correct, answers exactly what was asked, "
                  "and is short.")


@dataclass
class RLAIFConfig:
    policy: str = ""  # the model dir whose sampled responses are judged (lmforge or Hugging Face)
    judge: str = ""  # the judge: a model dir prompted with the rubric (lmforge or Hugging Face), or a reward model
                     # dir (lmforge reward), which scores each response
    rubric: str = DEFAULT_RUBRIC  # the judge's written rubric (a model judge)
    rubric_file: str = ""  # or a text file holding the rubric
    data: PromptDataSection = field(default_factory=PromptDataSection)
    split: Literal["train", "validation", "test"] = "train"  # split of the built-in prompts
    limit: int = 200  # prompts to sample and judge (0 = all)
    samples: int = 2  # responses sampled per prompt (> 2: a ranked list)
    max_new_tokens: int = 32  # tokens per sampled response at most
    temperature: float = 1.0  # sampling temperature of the policy (> 0)
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    both_orders: bool = True  # a model judge sees each pair in both orders and the two verdicts are averaged
                              # (cancels its position bias)
    agreement_limit: int = 200  # pairs of each built-in preference set (test split) the judge also labels, to
                                # measure its agreement with the true labels (0 = skip)
    batch_size: int = 16  # sequences per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0  # seeds the sampling
    out: str = "rlaif-preferences.jsonl"  # the preference JSONL written ({prompt, chosen, rejected} or ranked
                                          # {prompt, responses}), which reward and dpo read


def _medusa_train() -> TrainConfig:
    return TrainConfig(batch_size=16, max_steps=500, lr=1e-3, min_lr=1e-4, weight_decay=0.0, eval_interval=100,
                       eval_batches=8, checkpoint_interval=250, log_interval=10)


@dataclass
class MedusaDataSection:
    dataset: str = ""  # a dataset dir (lmforge data prepare) made with the base model's tokenizer: its token
                       # windows are the training rows, or with self_distill the source of the prompts
    seq_len: Optional[int] = None  # tokens per row; None -> the model's block_size
    self_distill: bool = False  # train on the base model's own continuations of prompts (what decoding sees)
                                # instead of the dataset's text
    prompts: Literal["dataset", "builtin"] = "dataset"  # self_distill: prompts are the first prompt_len tokens of
                                                        # dataset windows, or the built-in instruction prompts
                                                        # (rendered with the chat template)
    prompt_len: int = 32  # self_distill with dataset prompts: tokens per prompt
    new_tokens: int = 64  # self_distill: tokens generated per prompt at most
    temperature: float = 0.0  # self_distill: sampling temperature of the continuations (0 = greedy)
    builtin_tasks: list[str] = field(default_factory=list)  # builtin prompts: the tasks taken (empty: all)
    per_task_limit: int = 0  # builtin prompts: at most this many per task (0 = all)
    cache_dir: Optional[str] = None  # built-in task cache; None = $LMFORGE_CACHE or ~/.cache/lmforge


@dataclass
class MedusaConfig:
    model: str = ""  # the base model dir (lmforge or Hugging Face), with its tokenizer; it stays frozen
    num_heads: int = 4  # K: head k predicts the token k + 1 places ahead
    num_layers: int = 1  # residual blocks per head
    decay: float = 0.8  # lambda: head k's loss weighs lambda^(k-1)
    data: MedusaDataSection = field(default_factory=MedusaDataSection)
    train: TrainConfig = field(default_factory=_medusa_train)
    out_dir: str = "runs/medusa"  # the run dir; the heads dir is written to OUT_DIR/final
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)
