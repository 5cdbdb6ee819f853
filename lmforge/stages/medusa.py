"""`lmforge medusa train`: Medusa-1 heads (Cai et al. 2024) on a frozen model, trained on the one loop.

The stage hands the loop a MedusaModel (the base model, frozen, and K new heads: lmforge.model.medusa), the Medusa
loss (lmforge.objectives.medusa: head k predicts the token k + 1 places ahead, weighted lambda^(k-1)) and one of
two batch sources:

- text (default): windows of a dataset dir's token shards, exactly as pretraining reads them (WindowSampler over
  the train split; validation windows spread over the val split);
- self-distillation (data.self_distill): the base model's own continuations. A batch is B prompts (the first
  prompt_len tokens of dataset windows, or the built-in instruction prompts rendered with the chat template), each
  continued by up to new_tokens tokens with `generate` (greedy by default: what greedy Medusa decoding has to
  guess); the loss is taken on the generated tokens only (prompt and padding targets are -100). Prompts come from
  a shuffled, seekable stream and each batch's sampling seed is a hash of its prompts, so a resumed run draws the
  same batches. The validation rows are generated once, from the val split's prompts.

Only the heads train, so checkpoints and final/ are heads dirs (config.json + medusa_heads.safetensors, and
the base's tokenizer files): `lmforge.model.medusa.load_medusa_heads(final, model)` loads them for
`lmforge.infer.medusa.medusa_generate`. Validation reports each head's loss and top-1 / top-5 accuracy
(val_head{k}_top1, ...) in metrics.jsonl and summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch

from lmforge.data.shards import TokenShards, read_meta
from lmforge.errors import ConfigError, DataError, TokenizerMismatchError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.generate import generate
from lmforge.model.fused_loss import IGNORE_INDEX
from lmforge.model.medusa import MedusaHeads, MedusaModel
from lmforge.objectives.medusa import medusa_objective
from lmforge.stages.common import base_model, check_batch_split, resolve_seq_len, tokenizer_source
from lmforge.stages.config import MedusaConfig, MedusaDataSection
from lmforge.tokenizer import Tokenizer
from lmforge.train.data import WindowSampler, num_windows, validation_batches
from lmforge.train.distributed import DistContext, close_distributed, init_distributed
from lmforge.train.loop import Stage, train
from lmforge.train.packing import ShuffledSampler

__all__ = ["MedusaConfig", "medusa_train", "distill_batch"]


def check_config(cfg: MedusaConfig) -> None:
    data = cfg.data
    checks = [(cfg.num_heads >= 1, "num_heads", cfg.num_heads, ">= 1"),
              (cfg.num_layers >= 0, "num_layers", cfg.num_layers, ">= 0"),
              (0 < cfg.decay <= 1, "decay", cfg.decay, "in (0, 1]"),
              (data.prompt_len >= 1, "data.prompt_len", data.prompt_len, ">= 1"),
              (data.new_tokens >= 1, "data.new_tokens", data.new_tokens, ">= 1"),
              (data.temperature >= 0, "data.temperature", data.temperature, ">= 0 (0 is greedy)"),
              (cfg.train.parallel == "ddp", "train.parallel", cfg.train.parallel, "ddp (fsdp is not supported)")]
    for ok, name, value, expected in checks:
        if not ok:
            raise ConfigError(f"medusa train: {name}={value!r}, expected {expected}")
    if not data.dataset and not (data.self_distill and data.prompts == "builtin"):
        raise ConfigError("medusa train needs data.dataset (a dir written by lmforge data prepare), or "
                          "--data.self_distill true --data.prompts builtin")


def check_dataset(dataset: str, tokenizer: Tokenizer, lm: Any) -> None:
    """The dataset's tokens must be the base model's: the same tokenizer, ids inside its vocabulary."""
    meta = read_meta(dataset)
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise TokenizerMismatchError(f"dataset {dataset} was tokenized with another tokenizer "
                                     f"({str(meta.get('tokenizer_fingerprint'))[:12]}) than the base model's "
                                     f"({tokenizer.fingerprint[:12]}); prepare it with --tokenizer MODEL_DIR")
    if meta["vocab_size"] > lm.config.vocab_size:
        raise TokenizerMismatchError(f"dataset {dataset} has vocab_size {meta['vocab_size']}, more than the "
                                     f"model's {lm.config.vocab_size}")


@torch.no_grad()
def distill_batch(lm: Any, prompts: Sequence[Sequence[int]], data: MedusaDataSection, seq_len: int, eos_id: Any,
                  seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rows of prompt + the base model's continuation, cut to seq_len + 1 tokens: input_ids (B, W) right-padded
    with 0 and targets (B, W), the next token where it is a generated one, else -100; W <= seq_len is the longest
    row's. Sampling is seeded by `seed` and a hash of the prompts (a batch is the same whenever it is drawn)."""
    key = zlib.crc32(repr([list(p) for p in prompts]).encode())
    cfg = GenerationConfig(max_new_tokens=data.new_tokens, temperature=data.temperature, seed=seed * 1_000_003 + key,
                           eos=eos_id is not None)
    completions = generate(lm, [list(p) for p in prompts], cfg, eos_id=eos_id)
    rows = [(list(prompt) + completion.token_ids)[:seq_len + 1] for prompt, completion in zip(prompts, completions)]
    width = max(len(tokens) for tokens in rows) - 1  # no column of padding only
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    targets = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, tokens) in enumerate(zip(prompts, rows)):
        input_ids[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        start = len(prompt) - 1  # input position whose next token is the first generated one
        targets[row, start:len(tokens) - 1] = torch.tensor(tokens[start + 1:])
    return {"input_ids": input_ids.to(device), "targets": targets.to(device)}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Head-1 targets of a self-distillation batch (rows end where their continuation does)."""
    return int((batch["targets"][:, 1:] != IGNORE_INDEX).sum())


def dataset_prompts(dataset: str, split: str, prompt_len: int) -> tuple[TokenShards, int]:
    """A split's tokens and how many prompt windows of prompt_len tokens it holds."""
    tokens = TokenShards(dataset, split)
    return tokens, num_windows(len(tokens), prompt_len)


def builtin_prompts(data: MedusaDataSection, tokenizer: Tokenizer, split: str, limit: int) -> list[list[int]]:
    """The built-in instruction prompts of `split`: each user turn with the chat template's assistant opening,
    cut to its last `limit` tokens."""
    from lmforge.tasks.builtin import instruction_conversations

    conversations = instruction_conversations(split, data.cache_dir, data.builtin_tasks or None,
                                              data.per_task_limit or None)
    return [tokenizer.encode_chat(conversation[:1])[-limit:] for conversation in conversations]


def prompt_lists(cfg: MedusaConfig, tokenizer: Tokenizer, seq_len: int) -> tuple[list[Any], list[list[int]], Any]:
    """(training prompt items, validation prompts, how a training item becomes token ids)."""
    data, tc = cfg.data, cfg.train
    wanted = tc.eval_batches * tc.batch_size
    limit = max(1, seq_len - data.new_tokens)  # room left for the continuation
    if data.prompts == "builtin":
        train_prompts = builtin_prompts(data, tokenizer, "train", limit)
        val_prompts = builtin_prompts(data, tokenizer, "validation", limit)[:wanted]
        return train_prompts, val_prompts, lambda item: item
    prompt_len = min(data.prompt_len, limit)
    train_tokens, count = dataset_prompts(data.dataset, "train", prompt_len)
    if count == 0:
        raise DataError(f"dataset {data.dataset}: the train split has {len(train_tokens)} tokens, fewer than "
                        f"data.prompt_len + 1 = {prompt_len + 1}")
    val_tokens, val_count = dataset_prompts(data.dataset, "val", prompt_len)
    chosen = [(i * val_count) // min(val_count, wanted) for i in range(min(val_count, wanted))]
    val_prompts = [val_tokens.read(w * prompt_len, prompt_len).tolist() for w in chosen]
    return list(range(count)), val_prompts, lambda w: train_tokens.read(w * prompt_len, prompt_len).tolist()


def distill_sources(cfg: MedusaConfig, lm: Any, tokenizer: Tokenizer, seq_len: int,
                    ctx: DistContext) -> tuple[ShuffledSampler, list[dict[str, torch.Tensor]]]:
    """The self-distillation batch source and validation batches (this rank's share)."""
    data, tc = cfg.data, cfg.train
    eos_id = tokenizer.eos_id
    items, val_prompts, to_ids = prompt_lists(cfg, tokenizer, seq_len)
    if not items:
        raise DataError("medusa train: no training prompts")

    def collate(chosen: list[Any], device: torch.device) -> dict[str, torch.Tensor]:
        return distill_batch(lm, [to_ids(item) for item in chosen], data, seq_len, eos_id, tc.seed, device)

    share = -(-tc.batch_size // ctx.world_size)
    val_batches = []
    for start in range(0, len(val_prompts), tc.batch_size):
        group = val_prompts[start:start + tc.batch_size]
        mine = group[ctx.rank * share:(ctx.rank + 1) * share]
        if mine:
            val_batches.append(distill_batch(lm, mine, data, seq_len, eos_id, tc.seed + 1, ctx.device))
    return ShuffledSampler(items, collate, tc.seed), val_batches


def text_sources(cfg: MedusaConfig, seq_len: int, ctx: DistContext) -> tuple[WindowSampler, list[Any]]:
    """Pretraining's window sampler over the train split and its validation windows."""
    tc = cfg.train
    train_tokens = TokenShards(cfg.data.dataset, "train")
    if num_windows(len(train_tokens), seq_len) == 0:
        raise DataError(f"dataset {cfg.data.dataset}: the train split has {len(train_tokens)} tokens, fewer than "
                        f"data.seq_len + 1 = {seq_len + 1}")
    val = validation_batches(TokenShards(cfg.data.dataset, "val"), seq_len, tc.batch_size, tc.eval_batches,
                             ctx.rank, ctx.world_size, ctx.device)
    return WindowSampler(train_tokens, seq_len, tc.seed), val


def medusa_train(cfg: MedusaConfig) -> Path:
    """Train Medusa heads for cfg.model; returns the run dir (the heads dir is final/)."""
    check_config(cfg)
    builtin = cfg.data.self_distill and cfg.data.prompts == "builtin"
    lm, tokenizer = base_model(cfg.model, "medusa train", chat=builtin)
    if cfg.data.dataset:
        check_dataset(cfg.data.dataset, tokenizer, lm)
    seq_len = resolve_seq_len(cfg.data.seq_len, lm)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=seq_len))
    ctx = init_distributed(cfg.train.device)
    try:
        tc = cfg.train
        check_batch_split(tc.batch_size, ctx.world_size)
        torch.manual_seed(tc.seed)
        lm = lm.to(ctx.device).eval()
        model = MedusaModel(lm, MedusaHeads.for_base(lm, cfg.num_heads, cfg.num_layers, base_name=str(cfg.model)))
        if cfg.data.self_distill:
            batches, val_batches = distill_sources(cfg, lm, tokenizer, seq_len, ctx)
        else:
            batches, val_batches = text_sources(cfg, seq_len, ctx)
        objective = functools.partial(medusa_objective, decay=cfg.decay)
        distill_row = (cfg.data.prompt_len if cfg.data.prompts == "dataset" else seq_len) + cfg.data.new_tokens
        row_tokens = min(seq_len, distill_row) if cfg.data.self_distill else seq_len  # at most, for tokens/s
        stage = Stage(
            name="medusa train", config=cfg, train=tc, out_dir=Path(cfg.out_dir), resume=cfg.resume, model=model,
            objective=functools.partial(objective, sync=False), eval_objective=objective, batches=batches,
            val_batches=val_batches, tokens_per_sample=row_tokens, tokenizer_dir=tokenizer_source(cfg.model, tokenizer),
            inputs=tuple(p for p in (cfg.model, cfg.data.dataset) if p),
            count_terms=count_targets if cfg.data.self_distill else None,
            model_files={"training.json": {"stage": "medusa", "base_model": str(cfg.model),
                                           "self_distill": cfg.data.self_distill}})
        return train(stage, ctx)
    finally:
        close_distributed(ctx)
