"""Optional metric sinks beside metrics.jsonl, through the libraries' own writers: TensorBoard (`SummaryWriter`, event
files in run_dir/tensorboard) and Weights & Biases in offline mode (run_dir/wandb; `wandb sync` uploads it later).

Each record of metrics.jsonl is logged at its step, every numeric field under "{kind}/{field}" ("train/loss",
"val/val_loss"). Neither library is a dependency: asking for one that is not installed is a ConfigError naming the
package to install.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.train.config import TrainConfig


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("kind", "train")
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class ExternalLoggers:
    """The sinks `train.tensorboard` and `train.wandb` ask for (none on processes other than rank 0)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, run_config: Any, enabled: bool = True) -> None:
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.wandb needs the wandb package (pip install wandb)") from None
            from lmforge.config import config_to_dict

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(mode="offline", dir=str(run_dir), project="lmforge", name=Path(run_dir).name,
                                    config=config_to_dict(run_config), reinit="finish_previous")

    def log(self, record: dict[str, Any]) -> None:
        scalars = _scalars(record)
        step = int(record.get("step", 0))
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
