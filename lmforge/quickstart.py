"""`lmforge quickstart`: raw text to a sampling model in one command, within a time budget.

Fetch the built-in WordNet corpus (falling back to the standard library's docstrings when Debian's apt-get is not
available), clean and tokenize it, train a BPE tokenizer, pretrain a small LLaMA-style model, evaluate it on held-out
text and print a summary with three sampled continuations.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import DataError
from lmforge.io import atomic_write_json

DEFAULT_PROMPTS = ["a small", "the act of", "a person who"]


@dataclass
class QuickstartConfig:
    out_dir: str = "runs/quickstart"
    corpus: str = "wordnet"
    fallback_corpus: str = "stdlib-docstrings"  # used when the corpus cannot be fetched (no apt-get, no registry)
    vocab_size: int = 4096
    preset: str = "quickstart"  # a named model preset (lmforge.model.config.PRESETS)
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 6e-3  # small models take a high rate: 6e-3 beat 3e-3 by 0.08 bits/byte at d_model 128
    max_steps: int = 0  # 0 = as many as fit in time_budget_s (the learning rate follows the clock)
    warmup_steps: int = 30
    time_budget_s: float = 600.0  # training wall-time budget; the whole command adds data prep and sampling
    eval_interval: int = 250
    seed: int = 1337
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 40
    temperature: float = 0.5
    top_k: int = 40
    cache_dir: str = ""  # built-in corpus cache ("" = $LMFORGE_CACHE or ~/.cache/lmforge)


def _prepare(cfg: QuickstartConfig, out: Path) -> tuple[Path, str]:
    from lmforge.data.prepare import DataConfig, prepare_dataset
    from lmforge.data.sources import SourceConfig

    last_error: DataError | None = None
    for corpus in dict.fromkeys([cfg.corpus, cfg.fallback_corpus]):
        data_cfg = DataConfig(sources=[SourceConfig.from_str(corpus)], out_dir=str(out / "data"),
                              vocab_size=cfg.vocab_size, seed=cfg.seed, cache_dir=cfg.cache_dir or None)
        if _prepared_with(out / "data", data_cfg):
            print(f"quickstart: reusing {out / 'data'} (prepared from '{corpus}' with the same settings)")
            return out / "data", corpus
        try:
            return prepare_dataset(data_cfg), corpus
        except DataError as exc:
            print(f"quickstart: corpus '{corpus}' unavailable ({exc}); trying the next one")
            last_error = exc
    assert last_error is not None
    raise last_error


def _prepared_with(dataset_dir: Path, data_cfg: Any) -> bool:
    """True when `dataset_dir` is a complete dataset prepared from exactly this config (so it can be reused)."""
    from lmforge.config import config_to_dict

    meta_path = dataset_dir / "meta.json"
    if not meta_path.is_file():
        return False
    recorded = json.loads(meta_path.read_text()).get("config")
    return recorded == json.loads(json.dumps(config_to_dict(data_cfg)))


def quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run every stage and return (and print, and save as summary.json) the figures of the run."""
    from lmforge.data.shards import read_meta
    from lmforge.infer.generate import GenerationConfig, generate
    from lmforge.model.config import ModelConfig
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.config import DataSection, PretrainConfig, TrainConfig
    from lmforge.io import check_replaceable_dir, dir_kind
    from lmforge.stages.pretrain import pretrain

    started = time.time()
    out = Path(cfg.out_dir)
    check_replaceable_dir(out, "summary.json", "quickstart dir")
    for part, kind in (("data", "dataset dir"), ("run", "run dir")):
        check_replaceable_dir(out / part, "config.json", kind)
    dataset_dir, corpus = _prepare(cfg, out)
    meta = read_meta(dataset_dir)
    prep_s = time.time() - started

    model_cfg = ModelConfig.preset(cfg.preset, vocab_size=meta["vocab_size"], block_size=cfg.seq_len)
    train_cfg = PretrainConfig(
        model=model_cfg,
        data=DataSection(dataset=str(dataset_dir), seq_len=cfg.seq_len),
        train=TrainConfig(batch_size=cfg.batch_size, max_steps=cfg.max_steps, lr=cfg.lr, min_lr=cfg.lr / 10,
                          warmup_steps=cfg.warmup_steps, eval_interval=cfg.eval_interval, seed=cfg.seed,
                          time_budget_s=cfg.time_budget_s, checkpoint_interval=cfg.eval_interval * 4),
        out_dir=str(out / "run"),
    )
    if dir_kind(out / "run") == "run dir":  # a quickstart run dir written before: a new quickstart is a new run
        shutil.rmtree(out / "run")
    run_dir = pretrain(train_cfg)
    train_summary = json.loads((run_dir / "summary.json").read_text())

    from lmforge.convert import load

    final_dir = run_dir / "final"
    model = load(final_dir)
    tokenizer = Tokenizer.load(final_dir)
    gen_cfg = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                               seed=cfg.seed)
    completions = generate(model, list(cfg.prompts), gen_cfg, tokenizer=tokenizer)
    samples = [{"prompt": p, "completion": c} for p, c in zip(cfg.prompts, [c.text or "" for c in completions])]

    summary = {
        "corpus": corpus,
        "dataset": str(dataset_dir),
        "train_tokens_available": meta["splits"]["train"]["tokens"],
        "model_dir": str(final_dir),
        "parameters": model.num_parameters(),
        "data_prep_s": round(prep_s, 1),
        **{k: train_summary[k] for k in ("steps", "tokens_seen", "val_loss", "val_bpb", "tokens_per_s", "mfu")
           if k in train_summary},
        "train_wall_s": train_summary.get("wall_time_s"),
        "wall_s": round(time.time() - started, 1),
        "samples": samples,
    }
    atomic_write_json(out / "summary.json", summary)
    _print_summary(summary)
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    print("\n== lmforge quickstart ==")
    print(f"corpus            {s['corpus']} ({s['train_tokens_available']:,} training tokens available)")
    print(f"parameters        {s['parameters']:,}")
    print(f"tokens seen       {s.get('tokens_seen', 0):,} in {s.get('steps', 0)} steps")
    print(f"wall time         {s['wall_s']:.0f} s (data {s['data_prep_s']:.0f} s, training {s['train_wall_s']:.0f} s)")
    if s.get("val_bpb") is not None:
        print(f"val loss          {s['val_loss']:.3f} nats/token, {s['val_bpb']:.3f} bits/byte")
    print(f"throughput        {s.get('tokens_per_s', 0):,.0f} tokens/s, MFU {100 * (s.get('mfu') or 0):.1f}%")
    print(f"model dir         {s['model_dir']}")
    for sample in s["samples"]:
        print(f"  > {sample['prompt']}{sample['completion']}")
