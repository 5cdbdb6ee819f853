"""The batch source of PPO: rollout batches of the current policy, scored, served as minibatches for several epochs.

With B = train.batch_size prompts per micro-step, A = grad_accum, M = num_minibatches and E = ppo_epochs, a rollout
batch holds R = B * A * M prompts (over all processes), one sampled response each. It is sampled when the previous
one is used up, and then serves E epochs of M optimizer steps; each epoch visits its rows in a fresh order drawn from
numpy's PCG64 seeded with (seed, rollout batch number, epoch). Sampling a rollout batch (no gradients, eval mode):

1. the next R prompts of the seeded prompt stream (lmforge.train.packing.ShuffledSampler); process r of W samples
   its R / W of them, each with its own generator seeded by its position in the stream (rollout_seed), through the
   KV-cached engine (lmforge.infer.rollout.sample_group), so the samples do not depend on W;
2. each process scores its responses (the reward model and verifiable rewards: `score`) and runs the policy with
   its value head (old_logps, old_values) and the reference (ref_logps) over them;
3. the processes exchange their rows, and every process holds the whole rollout batch (on the CPU), computes the
   KL-penalized rewards, GAE advantages (whitened over the whole batch) and returns of lmforge.objectives.ppo.

A micro-batch is B rows of the epoch's order, each process taking its B / W. Its PPO terms are token means; the
batch's loss_scale = n * A * W / N (n: its response tokens, N: those of the optimizer step's whole minibatch) makes
the loop's mean over micro-steps and processes the token mean over the minibatch, however the rows split.

Early stop (target_kl > 0): before each epoch after the first, the approximate KL of the current policy to the
rollout policy over the whole rollout batch (lmforge.objectives.ppo.approx_kl, all processes' rows) is measured;
above target_kl the remaining epochs are skipped and a fresh rollout batch is sampled at once.

PPO-ptx: with a pretraining window sampler, every micro-batch also carries B / W windows of it (ptx_input_ids,
ptx_targets), the sampler advancing by B per micro-step.

Resume: the state is the prompt stream's and the ptx sampler's positions, the counters and, while it still serves
steps, the rollout batch itself (every process holds it; the policy that sampled it is gone, so it cannot be
sampled again). A run resumed from any step continues exactly as the uninterrupted one, on any number of processes.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.infer.config import GenerationConfig
from lmforge.infer.rollout import sample_group
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.objectives.ppo import approx_kl, gae, kl_penalized_rewards, last_token_index, whiten
from lmforge.stages.rollouts import Prompt, collate_rollouts, rollout_seed, token_logps
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import all_gather_objects, all_reduce
from lmforge.train.packing import ShuffledSampler

Batch = dict[str, Tensor]
Scorer = Callable[[Sequence[Prompt], list[str]], list[float]]
ROW_KEYS = ("input_ids", "targets", "old_logps", "old_values", "advantages", "returns")


@dataclass
class PPOSettings:
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ppo_epochs: int = 4
    num_minibatches: int = 4
    target_kl: float = 0.0


def pad_rows(rows: Sequence[Tensor], fill: float | int) -> Tensor:
    """Right-pad 2-d tensors (n_i, T_i) to the widest and stack them along the rows."""
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=fill) for r in rows])


class PPORollouts:
    """The loop's batch source for PPO (see the module docstring). model is the raw PolicyWithValue (never a DDP
    wrapper); reference is None when kl_coef = 0; ptx a pretraining window sampler (lmforge.train.data) or None."""

    def __init__(self, model: nn.Module, prompts: Sequence[Prompt], tokenizer: Tokenizer, score: Scorer,
                 generation: GenerationConfig, settings: PPOSettings, grad_accum: int, seed: int,
                 reference: Optional[nn.Module] = None, ptx: Any = None,
                 precision: Callable[[], ContextManager] = nullcontext) -> None:
        self.model, self.reference, self.tokenizer, self.score = model, reference, tokenizer, score
        self.generation, self.settings, self.grad_accum, self.seed = generation, settings, grad_accum, seed
        self.ptx, self.precision = ptx, precision
        self.stop_ids = tuple(tokenizer.chat_stop_ids)
        self.prompts = ShuffledSampler(list(prompts), lambda chosen, device: chosen, seed)
        self.rollout_batches = 0  # rollout batches sampled so far
        self.served = 0  # micro-batches served from the current one
        self.early_stops = 0  # rollout batches left before their last epoch (target_kl)
        self.table: Optional[dict[str, Tensor]] = None  # the current rollout batch, every process's rows (CPU)

    @property
    def steps_per_epoch(self) -> int:
        return self.settings.num_minibatches * self.grad_accum  # micro-batches per epoch

    def next_batch(self, global_batch: int, rank: int, world: int, device: torch.device) -> Batch:
        """This rank's share of the next micro-batch (see the module docstring)."""
        per_epoch = self.steps_per_epoch
        if self.table is None or self.served >= self.settings.ppo_epochs * per_epoch:
            self.sample(global_batch * per_epoch, rank, world, device)
        elif self.served % per_epoch == 0 and self.settings.target_kl > 0:
            if self.rollout_kl(global_batch // world, rank, world, device) > self.settings.target_kl:
                self.early_stops += 1
                self.sample(global_batch * per_epoch, rank, world, device)
        epoch, index = divmod(self.served, per_epoch)
        order = self.epoch_order(epoch)
        step = index // self.grad_accum * self.grad_accum  # the optimizer step's first micro-batch
        step_rows = order[step * global_batch:(step + self.grad_accum) * global_batch]
        micro = order[index * global_batch:(index + 1) * global_batch]
        share = global_batch // world
        batch = self.rows(micro[rank * share:(rank + 1) * share], device)
        step_tokens = float(self.table["response_tokens"][torch.as_tensor(step_rows)].sum())
        batch["loss_scale"] = torch.tensor(float((batch["targets"] != IGNORE_INDEX).sum()) * self.grad_accum
                                           * world / step_tokens, device=device)
        batch["ppo_epoch"] = torch.tensor(float(epoch), device=device)
        if self.ptx is not None:
            windows = self.ptx.next_batch(global_batch, rank, world, device)
            batch["ptx_input_ids"], batch["ptx_targets"] = windows["input_ids"], windows["targets"]
        self.served += 1
        return batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        rows = self.table["scores"].shape[0]
        return np.random.Generator(np.random.PCG64([self.seed, self.rollout_batches, epoch])).permutation(rows)

    def rows(self, chosen: Sequence[int], device: torch.device) -> Batch:
        """The chosen rows of the rollout batch, cut to their longest row, on `device`."""
        index = torch.as_tensor(np.asarray(chosen, dtype=np.int64))
        width = int(self.table["lengths"][index].max())
        batch = {k: self.table[k][index, :width] for k in ROW_KEYS}
        batch.update(scores=self.table["scores"][index], seq_kl=self.table["seq_kl"][index])
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def forward_rows(self, batch: Batch, chunk: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(logps, values, reference logps or None) of a batch's rows, `chunk` rows at a time."""
        parts: list[tuple[Tensor, Tensor, Optional[Tensor]]] = []
        for start in range(0, batch["input_ids"].shape[0], chunk):
            rows = {k: batch[k][start:start + chunk] for k in ("input_ids", "targets")}
            logps, values, _ = self.model(rows["input_ids"], targets=rows["targets"])
            ref = token_logps(self.reference, rows) if self.reference is not None else None
            parts.append((logps.float(), values.float(), ref))
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts]) if self.reference is not None else None)

    def sample(self, rollout_size: int, rank: int, world: int, device: torch.device) -> None:
        """Sample, score and evaluate this rank's share of a fresh rollout batch of rollout_size prompts, gather
        every rank's rows and compute the advantages and returns over all of them."""
        share = rollout_size // world
        first = self.prompts.sample + rank * share  # this rank's first prompt in the stream
        chosen = self.prompts.next_batch(rollout_size, rank, world, device)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with self.precision():
                responses = [sample_group(model.lm, p.ids, 1, self.generation, self.stop_ids,
                                          torch.Generator(device).manual_seed(rollout_seed(self.seed, first + i)))[0]
                             for i, p in enumerate(chosen)]
            texts = [self.tokenizer.decode(r[:-1] if r[-1] in self.stop_ids else r, skip_special_tokens=True)
                     for r in responses]
            scores = torch.tensor(self.score(chosen, texts), dtype=torch.float32)
            batch = {k: v.to(device) for k, v in collate_rollouts(chosen, responses, 1, self.tokenizer.pad_id).items()}
            with self.precision():
                logps, values, ref_logps = self.forward_rows(batch, max(1, share // self.steps_per_epoch))
        finally:
            model.train(was_training)
        mine = {"input_ids": batch["input_ids"].cpu(), "targets": batch["targets"].cpu(), "old_logps": logps.cpu(),
                "old_values": values.cpu(), "scores": scores}
        if ref_logps is not None:
            mine["ref_logps"] = ref_logps.cpu()
        self.table = self.advantages(all_gather_objects(mine))
        self.rollout_batches += 1
        self.served = 0

    def advantages(self, parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The rollout batch of every rank's rows (in rank order), with rewards, advantages and returns."""
        fills = {"input_ids": self.tokenizer.pad_id, "targets": IGNORE_INDEX}
        table = {k: pad_rows([p[k] for p in parts], fills.get(k, 0.0)) for k in parts[0] if k != "scores"}
        table["scores"] = torch.cat([p["scores"] for p in parts])
        mask = table["targets"] != IGNORE_INDEX
        ref_logps = table.pop("ref_logps", table["old_logps"])  # no reference (kl_coef = 0): no penalty
        s = self.settings
        rewards = kl_penalized_rewards(table["scores"], table["old_logps"], ref_logps, mask, s.kl_coef)
        advantages, returns = gae(rewards, table["old_values"] * mask, mask, s.gamma, s.lam)
        table["advantages"] = whiten(advantages, mask) if s.whiten_advantages else advantages
        table["returns"] = returns
        table["seq_kl"] = ((table["old_logps"] - ref_logps) * mask).sum(dim=1)
        table["response_tokens"] = mask.sum(dim=1)
        table["lengths"] = last_token_index(mask) + 1  # a row ends with its response
        return table

    @torch.no_grad()
    def rollout_kl(self, share: int, rank: int, world: int, device: torch.device) -> float:
        """approx_kl of the current policy to the rollout policy over the whole rollout batch (every rank
        measures its part; collective)."""
        rows = self.table["scores"].shape[0]
        per_rank = -(-rows // world)
        mine = list(range(rank * per_rank, min(rows, (rank + 1) * per_rank)))
        total, tokens = 0.0, 0.0
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(mine), max(1, share)):
                batch = self.rows(mine[start:start + max(1, share)], device)
                mask = batch["targets"] != IGNORE_INDEX
                with self.precision():
                    logps, _, _ = model(batch["input_ids"], targets=batch["targets"])
                count = float(mask.sum())
                total += float(approx_kl(logps, batch["old_logps"], mask)) * count
                tokens += count
        finally:
            model.train(was_training)
        total, tokens = all_reduce([total, tokens], device)
        return total / max(tokens, 1.0)

    def state_dict(self) -> dict[str, Any]:
        in_use = self.table is not None and self.served < self.settings.ppo_epochs * self.steps_per_epoch
        return {"prompts": self.prompts.state_dict(), "rollout_batches": self.rollout_batches,
                "served": self.served, "early_stops": self.early_stops, "table": self.table if in_use else None,
                "ptx": self.ptx.state_dict() if self.ptx is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts.load_state_dict(state["prompts"])
        self.rollout_batches, self.served = state["rollout_batches"], state["served"]
        self.early_stops, self.table = state["early_stops"], state["table"]
        if self.ptx is not None:
            self.ptx.load_state_dict(state["ptx"])
