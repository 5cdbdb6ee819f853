"""A policy with a value head (PPO's actor and critic sharing one trunk, as in InstructGPT's and TRL's PPO).

    logp_t = log softmax(W_lm h_t)[y_t]     the language model's own head, on the response positions only
    v_t    = w_v . h_t + b_v                a linear value head, on every position

Both come from ONE trunk forward (`lm.hidden_states`). `lm` is any model with hidden_states and lm_head: a
Transformer, or a PeftModel around one (the value head then trains next to the adapter, the base stays frozen).

The value head starts at zero (v = 0 everywhere; the first advantages are the rewards' own returns). InstructGPT
initialized its value function from the reward model, but that is a separate trunk: a reward model's head read off
the policy's hidden states would not score anything, so no head is copied.

Files: `save` writes the language model as it saves itself (a model dir, or an adapter dir for PEFT) plus
value_head.safetensors and value_head.json, which model loaders ignore: a PPO checkpoint resumes with its value
head, and the same dir chats and generates like any model dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lmforge.io import atomic_write_json, load_safetensors, save_safetensors
from lmforge.model.fused_loss import token_logprobs
from lmforge.model.heads import LMWrapper

VALUE_HEAD_WEIGHTS = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"


class PolicyWithValue(LMWrapper):
    """A language model and a scalar value head on its final hidden states; see the module docstring."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__(lm)
        self.value_head = nn.Linear(lm.config.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def flops_per_token(self, seq_len: int) -> int:
        return self.lm.flops_per_token(seq_len) + 6 * self.value_head.weight.numel()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return self.lm.num_parameters(exclude_embeddings) + sum(p.numel() for p in self.value_head.parameters())

    def values(self, hidden: Tensor) -> Tensor:
        """(N, T) float32 values of hidden states (N, T, d), computed in float32 (a regression target wants the
        precision; the head is one dot product)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)

    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None, lm_ids: Optional[Tensor] = None,
                lm_targets: Optional[Tensor] = None) -> Any:
        """(logps, values, lm_loss). input_ids, targets (N, T), targets -100 where no log-probability is wanted:
        logps (N, T) the log-probabilities of the targets (0 at -100), values (N, T) at every position, both
        float32, from one pass of the trunk. lm_ids, lm_targets (M, S): other rows whose mean causal-LM loss is
        lm_loss (PPO-ptx's pretraining batch; None without them). A bare call (no targets: the dummy forward of
        validation under FSDP) returns the language model's logits."""
        if targets is None:
            return self.lm(input_ids)
        hidden = self.lm.hidden_states(input_ids)  # (N, T, d): the one trunk pass of the rollouts
        logps = token_logprobs(hidden, self.lm.lm_head.weight, targets)
        lm_loss = self.lm(lm_ids, targets=lm_targets) if lm_ids is not None else None
        return logps, self.values(hidden), lm_loss

    # ---- persistence: the language model's own files plus the value head's -------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.lm.save(directory)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                         directory / VALUE_HEAD_WEIGHTS)
        atomic_write_json(directory / VALUE_HEAD_CONFIG, {"d_model": self.value_head.in_features})

    def saved_mismatch(self, directory: str | Path) -> Optional[str]:
        problem = self.lm.saved_mismatch(directory)
        if problem:
            return problem
        if not (Path(directory) / VALUE_HEAD_WEIGHTS).is_file():
            return f"{directory} holds no {VALUE_HEAD_WEIGHTS} (it was not written by lmforge ppo)"
        return None

    def load_saved(self, directory: str | Path) -> None:
        self.lm.load_saved(directory)
        self.value_head.load_state_dict(load_safetensors(Path(directory) / VALUE_HEAD_WEIGHTS))
