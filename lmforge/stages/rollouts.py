"""Prompts with checkable answers, and the batch source of GRPO: rollouts of the current policy, scored.

Prompts come from JSONL files of {"prompt": text or a list of chat messages, "answer": text} or from the built-in
arithmetic task; each is rendered with the chat template and a generation prompt (`Tokenizer.encode_chat`).

`RolloutSource` serves the loop's batches. A rollout batch of B prompts holds N = B * G rows, the G completions of
a prompt adjacent, each row a prompt followed by one completion, right-padded:

    input_ids (N, T)   prompt + completion but the last token; targets (N, T): the next tokens on the completion
                       (its stop token included), -100 on the prompt and the padding
    rewards (N,)       the weighted sum of the rewards; advantages (N,): relative to the prompt's group
    old_logps (N, T)   the sampling policy's log-probabilities of the targets (0 off the completion)
    ref_logps (N, T)   the reference model's, when there is one (beta > 0)

Generation and the log-probabilities run without gradients in eval mode (the mode is restored). The prompts come
in a seeded shuffled order (lmforge.train.packing.ShuffledSampler) and each prompt's group is drawn by its own
generator, seeded by (seed, the prompt's position in that stream): a resumed run samples what the uninterrupted run
did, and the samples do not depend on how the prompts are split over processes and micro-batches. With
iterations > 1 the rollout batches of a step are reused for the next iterations - 1 steps, and are part of the saved
state while they are, since the policy that sampled them is gone (every process keeps every process's batches, as
rank 0 alone writes the checkpoint).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.data.mixture import hash_fraction
from lmforge.errors import DataError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.rollout import sample_group
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.objectives.grpo import group_advantages
from lmforge.objectives.rewards import RewardFn, score
from lmforge.stages.config import GRPODataSection
from lmforge.tasks.formats import iter_jsonl
from lmforge.tasks.preferences import prompt_turns
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import all_gather_objects
from lmforge.train.packing import ShuffledSampler

Batch = dict[str, Tensor]
Rewards = Sequence[tuple[str, RewardFn, float]]


@dataclass
class Prompt:
    where: str  # file:line, or builtin split #i
    messages: list[dict[str, str]]
    answer: str
    ids: list[int] = field(default_factory=list)  # the chat-rendered prompt, ending with the generation prompt

    @property
    def text(self) -> str:
        """What reward functions get as the prompt: the last user turn's content."""
        return next((m["content"] for m in reversed(self.messages) if m.get("role") == "user"),
                    self.messages[-1]["content"])


def read_prompts(path: str) -> list[Prompt]:
    """The prompts of a JSONL file; a DataError naming file:line for a record of another shape."""
    prompts = []
    for number, record in iter_jsonl(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f"{where}: expected {{\"prompt\": text or a list of chat messages, \"answer\": text}}, "
                            f"got {str(record)[:200]}")
        prompt = prompt_turns(record["prompt"], where, "prompt")  # non-empty, ending with a user turn
        answer = record.get("answer", "")
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{where}: \"answer\" must be text, got {answer!r}"[:300])
        prompts.append(Prompt(where, prompt, answer))
    if not prompts:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")
    return prompts


def builtin_prompts(data: GRPODataSection, split: str, limit: Optional[int] = None) -> list[Prompt]:
    """The built-in arithmetic task's prompts of `split`, with their exact answers."""
    from lmforge.tasks.builtin import load_task

    return [Prompt(f"builtin arithmetic {split} #{i}", [{"role": "user", "content": example.prompt}],
                   example.answers[0]) for i, example in enumerate(load_task("arithmetic", split, data.cache_dir,
                                                                             limit))]


def load_prompts(data: GRPODataSection, builtin: Callable[[Any, str, Optional[int]], list[Prompt]] = builtin_prompts
                 ) -> tuple[list[Prompt], list[Prompt]]:
    """The (train, val) prompts the data section names; `builtin(data, split, limit)` gives those of `builtin`
    (default: the arithmetic task's)."""
    files = [f for f in data.train if f != "builtin"]
    train_set = [p for f in files for p in read_prompts(f)]
    val_set = [p for f in data.val for p in read_prompts(f)]
    if not data.val and files:  # hold out val_fraction of the files' prompts, by a hash of their text
        held = [hash_fraction(repr(p.messages), data.val_fraction) for p in train_set]
        val_set = [p for p, h in zip(train_set, held) if h]
        train_set = [p for p, h in zip(train_set, held) if not h]
    if "builtin" in data.train:
        train_set += builtin(data, "train", data.per_task_limit or None)
        if not data.val:
            val_set += builtin(data, "validation", None)
    if not train_set:
        raise DataError(f"data.train {', '.join(data.train)}: no prompts")
    return train_set, val_set


def tokenize_prompts(prompts: list[Prompt], tokenizer: Tokenizer, system_prompt: Optional[str],
                     max_prompt_tokens: int) -> tuple[list[Prompt], int]:
    """The prompts with their chat-rendered ids, leaving out those over max_prompt_tokens; and how many were."""
    kept = []
    for prompt in prompts:
        if system_prompt and prompt.messages[0].get("role") != "system":
            prompt.messages = [{"role": "system", "content": system_prompt}, *prompt.messages]
        try:
            prompt.ids = tokenizer.encode_chat(prompt.messages, add_generation_prompt=True)
        except DataError as exc:
            raise DataError(f"{prompt.where}: {exc}") from None
        if len(prompt.ids) <= max_prompt_tokens:
            kept.append(prompt)
    return kept, len(prompts) - len(kept)


def collate_rollouts(prompts: Sequence[Prompt], completions: Sequence[Sequence[int]], group_size: int,
                     pad_id: int) -> Batch:
    """input_ids and targets (N, T) of the module docstring; completions[i * G + g] is prompt i's g-th."""
    rows = []
    for i, completion in enumerate(completions):
        prompt = prompts[i // group_size].ids
        rows.append(((list(prompt) + list(completion))[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + list(completion)))
    width = max(len(inputs) for inputs, _ in rows)
    return {"input_ids": torch.tensor([inputs + [pad_id] * (width - len(inputs)) for inputs, _ in rows]),
            "targets": torch.tensor([targets + [IGNORE_INDEX] * (width - len(targets)) for _, targets in rows])}


def rollout_seed(seed: int, position: int, validation: bool = False) -> int:
    """The 63-bit generator seed of the rollouts of the prompt at `position` (in the training stream, or in the
    validation prompts): the run's seed and the position mixed by numpy's SeedSequence."""
    state = np.random.SeedSequence([seed, int(validation), position]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@torch.no_grad()
def token_logps(model: nn.Module, batch: Batch) -> Tensor:
    """The model's log-probabilities of the batch's targets (N, T), 0 off the completions."""
    return model(batch["input_ids"], targets=batch["targets"], per_token=True).float()


class RolloutSource:
    """The loop's batch source for GRPO (see the module docstring). model is the raw policy (never a DDP or FSDP
    wrapper): each process samples the rollouts of its own share of the prompts."""

    def __init__(self, model: nn.Module, prompts: Sequence[Prompt], tokenizer: Tokenizer, rewards: Rewards,
                 generation: GenerationConfig, group_size: int, scale_rewards: bool, iterations: int,
                 grad_accum: int, seed: int, reference: Optional[nn.Module] = None,
                 precision: Callable[[], ContextManager] = nullcontext) -> None:
        self.model, self.reference, self.tokenizer, self.rewards = model, reference, tokenizer, rewards
        self.generation, self.group_size, self.scale_rewards = generation, group_size, scale_rewards
        self.iterations, self.grad_accum, self.seed, self.precision = iterations, grad_accum, seed, precision
        self.stop_ids = tuple(tokenizer.chat_stop_ids)
        self.prompts = ShuffledSampler(list(prompts), lambda chosen, device: chosen, seed)
        self.calls = 0  # next_batch calls so far (micro-steps)
        self.reused: list[list[Batch]] = []  # this cycle's rollout batches (on the CPU) of every process, by
                                             # micro-step then rank, while iterations > 1

    def next_batch(self, global_batch: int, rank: int, world: int, device: torch.device) -> Batch:
        """Fresh rollouts of the next global_batch prompts (this rank's share) on the first step of a cycle of
        `iterations` steps, the same batches again on its other steps."""
        position = self.calls % (self.grad_accum * self.iterations)
        micro = position % self.grad_accum
        if position < self.grad_accum:
            first = self.prompts.sample + rank * (global_batch // world)  # this rank's first prompt in the stream
            chosen = self.prompts.next_batch(global_batch, rank, world, device)
            batch = self.rollouts(chosen, [rollout_seed(self.seed, first + i) for i in range(len(chosen))], device)
            if micro == 0:
                self.reused = []
            if self.iterations > 1:  # every process keeps all of them: rank 0 saves the checkpoint
                self.reused.append(all_gather_objects({k: v.cpu() for k, v in batch.items()}))
        else:
            if len(self.reused[micro]) != world:
                raise DataError(f"the checkpoint was written between the iterations of a rollout batch by "
                                f"{len(self.reused[micro])} processes; resume it with as many")
            batch = {k: v.to(device) for k, v in self.reused[micro][rank].items()}
        self.calls += 1
        return batch

    def rollouts(self, prompts: Sequence[Prompt], seeds: Sequence[int], device: torch.device) -> Batch:
        """Sample G completions of every prompt with the current policy (prompt i's drawn by a generator seeded
        with seeds[i]), score them and compute the advantages, the old log-probabilities and (with a reference) the
        reference log-probabilities."""
        model, group = self.model, self.group_size
        was_training = model.training
        model.eval()
        try:
            with self.precision():
                completions = [c for p, seed in zip(prompts, seeds)
                               for c in sample_group(model, p.ids, group, self.generation, self.stop_ids,
                                                     torch.Generator(device).manual_seed(seed))]
            batch = collate_rollouts(prompts, completions, group, self.tokenizer.pad_id)
            texts = [self.tokenizer.decode(c[:-1] if c[-1] in self.stop_ids else c, skip_special_tokens=True)
                     for c in completions]
            totals, _ = score(self.rewards, [p.text for p in prompts for _ in range(group)], texts,
                              [p.answer for p in prompts for _ in range(group)])
            batch["rewards"] = torch.tensor(totals, dtype=torch.float32)
            batch["advantages"] = group_advantages(batch["rewards"], group, self.scale_rewards)
            batch = {k: v.to(device) for k, v in batch.items()}
            with self.precision():
                batch["old_logps"] = token_logps(model, batch)
                if self.reference is not None:
                    batch["ref_logps"] = token_logps(self.reference, batch)
        finally:
            model.train(was_training)
        return batch

    def state_dict(self) -> dict[str, Any]:
        mid_cycle = self.calls % (self.grad_accum * self.iterations) != 0
        return {"prompts": self.prompts.state_dict(), "calls": self.calls,
                "reused": self.reused if mid_cycle else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.calls, self.reused = state["calls"], [list(batches) for batches in state["reused"]]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` without gradients, in eval mode: the reference policy."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()
