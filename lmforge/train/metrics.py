"""Run metrics: metrics.jsonl (one JSON record per line), a tqdm progress bar, and the loss-curve plot.

Records carry "kind": "train" records (step, tokens, loss, lr, grad_norm, tok_per_s, mfu, elapsed_s) and "val"
records (step, tokens, val_loss, val_bpb).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from lmforge.errors import DataError
from lmforge.io import atomic_write_bytes, atomic_write_text


class MetricsLog:
    """Append-only JSON-lines file, flushed after every record so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        """The records; an undecodable last line (a write torn by a kill) is skipped, not an error."""
        if not self.path.is_file():
            return []
        lines = [(n, line) for n, line in enumerate(self.path.read_bytes().split(b"\n"), 1) if line.strip()]
        records = []
        for i, (n, line) in enumerate(lines):
            try:
                records.append(json.loads(line.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if i == len(lines) - 1:
                    break  # torn final write
                raise DataError(f"{self.path}:{n}: not a JSON record (the metrics log is corrupt; fix or "
                                "delete that line)") from None
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records after `step` (logged by a run that died before its next checkpoint), before resuming."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """Step progress bar; `update_progress` fills in loss, tok/s and MFU."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def update_progress(bar: tqdm, steps: int, loss: float, tok_per_s: float, mfu: Optional[float]) -> None:
    bar.update(steps)
    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_per_s:,.0f}", mfu=f"{100 * mfu:.1f}%" if mfu else "n/a",
                    refresh=False)


PLOTTED_FIGURES = ("accuracy", "margin", "reward", "kl")  # objective figures that get a panel of their own


def plot_loss(records: list[dict[str, Any]], path: Path) -> None:
    """PNG of train and val loss against optimizer step and tokens seen, written atomically; and one more panel
    against step for each of the objective's figures the records hold (a preference stage's accuracy, margin,
    a reward), train and val."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's global state alone

    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val" and r.get("val_loss") is not None]
    extra = [k for k in PLOTTED_FIGURES if any(k in r for r in train) or any(f"val_{k}" in r for r in val)]
    fig = Figure(figsize=(11 + 4 * len(extra), 4))
    axes = fig.subplots(1, 2 + len(extra))
    for ax, x in zip(axes, ("step", "tokens")):
        ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train", linewidth=1)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="val", markersize=3)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss")
    axes[1].sharey(axes[0])
    axes[0].legend()
    for ax, key in zip(axes[2:], extra):
        points = [(r["step"], r[key]) for r in train if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], label="train", linewidth=1)
        points = [(r["step"], r[f"val_{key}"]) for r in val if r.get(f"val_{key}") is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="val", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
