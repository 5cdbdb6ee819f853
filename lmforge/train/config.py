"""PretrainConfig: the one config of the pretraining stage (sections model, data, train)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from lmforge.model.config import ModelConfig


@dataclass
class DataSection:
    dataset: str = ""  # a dir written by `lmforge data` (meta.json + token shards)
    seq_len: Optional[int] = None  # tokens the model reads per sample; None -> model.block_size


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-step summed over all processes; each of W processes takes 1/W
    grad_accum: int = 1  # micro-steps per optimizer step; tokens/step = batch_size * grad_accum * seq_len
    max_steps: int = 1000  # optimizer steps; 0 with time_budget_s > 0: as many as the budget allows
                           # (the learning rate follows the clock)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # final learning rate of the cosine and wsd schedules
    warmup_steps: Optional[int] = None  # linear warmup steps; None -> min(100, max_steps // 10)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_frac: float = 0.2  # wsd: fraction of max_steps spent in the final linear decay
    weight_decay: float = 0.1  # applied to 2-D weights except embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 = no clipping
    eval_interval: int = 250  # steps between validation passes (and one at the end); 0 = only at the end
    eval_batches: int = 20  # validation batches of batch_size windows
    checkpoint_interval: int = 500  # steps between checkpoints (and one at the end); 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; 0 = keep all
    log_interval: int = 10  # steps between metrics.jsonl train records (and one at the end); 0 = only at the end
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: float32 on CPU, bfloat16 autocast on CUDA
    compile: bool = False  # torch.compile the model
    parallel: Literal["ddp", "fsdp"] = "ddp"  # ddp replicates the model; fsdp (FSDP2) shards weights, grads, optimizer
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    time_budget_s: float = 0.0  # stop cleanly (eval, checkpoint, final model) within this many seconds in all; 0 = none
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = look up the GPU or measure the CPU (best seen, cached)
    tensorboard: bool = False  # also log metrics to run_dir/tensorboard with TensorBoard's own writer
    wandb: bool = False  # also log metrics to Weights & Biases (offline mode: run_dir/wandb; `wandb sync` uploads)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/pretrain"  # the run dir
    resume: bool = False  # continue from the newest checkpoint in out_dir (same config: --config OUT_DIR/config.json)
    init_from: Optional[str] = None  # start from the weights (and config) of this model dir instead of random init
