"""Task heads on a language model, as GPT-1 fine-tunes (Radford et al. 2018): a linear layer on the final hidden state
of each sequence's extract token.

    classify, entailment:  logits = W h(x)                     one sequence per item
    similarity:            logits = W (h(a, b) + h(b, a))       the pair in both orders, the two states added
    multiple_choice:       score_k = w . h(context, choice_k)  one sequence per choice; a softmax over the k scores
    reward:                r = w . h(x, y) + b                  the final token's state (lmforge reward)

`lm` is any model with `hidden_states(input_ids)` and an `lm_head` (a Transformer, or a PeftModel around one), so a
task head trains with full fine-tuning or with any parameter-efficient method. The forward pass also returns the
language-modelling loss of the same sequences, GPT-1's auxiliary objective (lmforge.objectives.task_head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lmforge.io import atomic_write_json, load_safetensors, save_safetensors
from lmforge.model.fused_loss import linear_cross_entropy

HeadKind = Literal["classify", "entailment", "similarity", "multiple_choice", "reward"]
HEAD_CONFIG = "task_head.json"
HEAD_WEIGHTS = "task_head.safetensors"


class LMWrapper(nn.Module):
    """A module around a language model `lm` (a Transformer or a PeftModel) that answers for it where the training
    loop asks: its config and its activation checkpointing switch."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def config(self) -> Any:
        return self.lm.config

    @property
    def activation_checkpointing(self) -> bool:
        return self.lm.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, value: bool) -> None:
        self.lm.activation_checkpointing = value


class TaskHeadModel(LMWrapper):
    """A language model and a linear task head; see the module docstring. `labels` names the classes."""

    def __init__(self, lm: nn.Module, kind: HeadKind, labels: list[str]) -> None:
        super().__init__(lm)
        self.kind, self.labels = kind, list(labels)
        outputs = 1 if kind in ("multiple_choice", "reward") else len(labels)
        self.head = nn.Linear(lm.config.d_model, outputs)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def flops_per_token(self, seq_len: int) -> int:
        return self.lm.flops_per_token(seq_len)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return self.lm.num_parameters(exclude_embeddings) + sum(p.numel() for p in self.head.parameters())

    def forward(self, input_ids: Tensor, extract: Optional[Tensor] = None, lm_targets: Optional[Tensor] = None,
                choices: int = 1) -> Any:
        """(logits per item, LM loss or None). input_ids (N, T) right-padded; extract (N,) the extract token's
        position in each row; lm_targets (N, T) the next tokens with -100 where no loss is taken. Items are rows,
        pairs of rows (similarity: [ab, ba]) or groups of `choices` rows (multiple choice)."""
        if extract is None:  # a bare call (FSDP's dummy forward in validation): the language model's logits
            return self.lm(input_ids)
        hidden = self.lm.hidden_states(input_ids)  # (N, T, d)
        states = hidden[torch.arange(hidden.shape[0], device=hidden.device), extract]  # (N, d)
        if self.kind == "similarity":
            states = states.view(-1, 2, states.shape[-1]).sum(dim=1)  # h(a, b) + h(b, a)
        logits = self.head(states)
        if self.kind == "multiple_choice":
            logits = logits.view(-1, choices)  # (items, K)
        lm_loss = None
        if lm_targets is not None:
            lm_loss = linear_cross_entropy(hidden, self.lm.lm_head.weight, lm_targets)
        return logits, lm_loss

    # ---- persistence: the language model's own files plus the head's -----------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.lm.save(directory)
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                         directory / HEAD_WEIGHTS)
        atomic_write_json(directory / HEAD_CONFIG, {"kind": self.kind, "labels": self.labels})

    def saved_mismatch(self, directory: str | Path) -> Optional[str]:
        problem = self.lm.saved_mismatch(directory)
        if problem:
            return problem
        saved = read_head_config(directory)
        if saved is None or (saved["kind"], saved["labels"]) != (self.kind, self.labels):
            return f"task head (saved {saved}, now kind {self.kind!r} with labels {self.labels})"
        return None

    def load_saved(self, directory: str | Path) -> None:
        self.lm.load_saved(directory)
        self.head.load_state_dict(load_safetensors(Path(directory) / HEAD_WEIGHTS))


def read_head_config(directory: str | Path) -> Optional[dict[str, Any]]:
    """The task head a model dir carries ({"kind", "labels"}), or None."""
    path = Path(directory) / HEAD_CONFIG
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_task_head(directory: str | Path, lm: Optional[nn.Module] = None) -> TaskHeadModel:
    """The model dir's language model (lmforge.convert.load, or `lm` when the caller has already loaded it) with
    its task head, in eval mode."""
    from lmforge.convert import load
    from lmforge.errors import LmforgeError

    config = read_head_config(directory)
    if config is None:
        raise LmforgeError(f"{directory}: no {HEAD_CONFIG} (not a model dir written by lmforge finetune)")
    model = TaskHeadModel(load(directory) if lm is None else lm, config["kind"], config["labels"])
    model.head.load_state_dict(load_safetensors(Path(directory) / HEAD_WEIGHTS))
    return model.eval()
