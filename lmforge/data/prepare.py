"""`lmforge data prepare`: sources -> clean -> dedup -> split -> mixture -> tokenize -> shards + meta.json.

Two streaming passes; no corpus is ever held in memory:
1. Documents stream from each source in order, in batches, through worker processes that clean them and compute
   their dedup fingerprints (`Pool.imap`, so results come back in input order). The main process deduplicates,
   splits each kept document into train or val by a hash of its cleaned text (stable across runs, seeds and
   mixtures: `mixture.hash_fraction(text, val_fraction)` -> val), uses its mixture draw (made for every document
   read; train only, see `mixture.py`) and spools it to a temp file inside the dataset dir being built.
2. If no tokenizer is given, one is trained on the spooled training text. The spool streams, in batches, to an
   encoder that turns each document into its ids followed by eos; the ids are appended to the shards of its split.
   The encoder is tiktoken (`fast_encode.py`: proven to give exactly the ids of `Tokenizer.encode`, checked again
   on the first batch of each split; run in threads, as it releases the GIL) when the tokenizer qualifies, else
   Hugging Face `tokenizers` in worker processes (each loads the tokenizer once). meta.json's `encoder` says which
   and why.

meta.json per source: documents and bytes read, weight, kept_documents (after cleaning and dedup), removed (count
per filter or dedup method), train_documents / val_documents (copies written), train_tokens / val_tokens, and
epochs (train copies / kept train documents). A split's `documents`, `tokens` and `bytes` count every copy written.

The dataset dir is built in a temp dir beside `out_dir` and renamed onto it at the end, so a failed run leaves an
existing dataset untouched. The tokenizer used is copied into `out_dir/tokenizer`, making the dir self-contained.
Output is identical for any `num_workers`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import struct
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional

import numpy as np

from lmforge.config import config_to_dict
from lmforge.data.clean import FILTERS, CleanConfig, CleanResult, clean_document
from lmforge.data.dedup import DedupConfig, Deduplicator, Fingerprint, Fingerprinter
from lmforge.data.fast_encode import FastEncoder, UnsupportedTokenizer, fast_encoder
from lmforge.data.mixture import SourceSampler, effective_epochs, hash_fraction
from lmforge.data.shards import DATASET_FORMAT, DEFAULT_SHARD_TOKENS, ShardWriter, shard_dtype
from lmforge.data.sources import SourceConfig, source_files
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_path, atomic_write_json, atomic_write_text, check_replaceable_dir
from lmforge.tokenizer import MIN_VOCAB_SIZE, Tokenizer

SPLITS = ("train", "val")
SAMPLES_PER_SOURCE = 5


@dataclass
class DataConfig:
    """Everything `prepare_dataset` needs (the `lmforge data prepare` options)."""

    sources: list[SourceConfig] = field(default_factory=list)  # PATH_OR_CORPUS[:WEIGHT][:key=value]...,
                                                               # comma-separated; keys: weight, name, kind,
                                                               # field, max_documents, split; corpora: wordnet,
                                                               # kjv, gcide, pydocs, stdlib-docstrings
    out_dir: str = ""  # the dataset dir to write (replaced atomically if it exists)
    tokenizer: Optional[str] = None  # tokenizer dir; None = train a byte-level BPE on the train split
    vocab_size: int = 4096  # size of the tokenizer trained when `tokenizer` is None
    val_fraction: float = 0.02  # share of documents (by text hash) held out for validation
    seed: int = 0  # mixture sampling seed
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    num_workers: int = 0  # workers (processes; threads for tiktoken): 0 = one per CPU, 1 = in-process
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per shard file
    batch_documents: int = 256  # documents sent to a worker at a time
    encoder: Literal["auto", "tiktoken", "tokenizers"] = "auto"  # auto: tiktoken where its ids are provably equal
    cache_dir: Optional[str] = None  # built-in corpus cache; None = $LMFORGE_CACHE or ~/.cache/lmforge


@dataclass
class _SourceStats:
    weight: float
    documents: int = 0
    bytes: int = 0
    kept_documents: int = 0
    removed: Counter = field(default_factory=Counter)
    split_documents: Counter = field(default_factory=Counter)  # copies written per split
    split_tokens: Counter = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"documents": self.documents, "bytes": self.bytes, "weight": self.weight,
                "kept_documents": self.kept_documents, "removed": dict(self.removed),
                "train_documents": self.split_documents["train"], "val_documents": self.split_documents["val"],
                "train_tokens": self.split_tokens["train"], "val_tokens": self.split_tokens["val"],
                "epochs": round(effective_epochs(self.split_documents["train"],
                                                 self.kept_documents - self.split_documents["val"]), 4)}


def prepare_dataset(cfg: DataConfig) -> Path:
    """Build the dataset dir `cfg.out_dir` (see the module docstring) and return its path."""
    given_tokenizer = _validate(cfg)
    out_dir = Path(cfg.out_dir)
    workers = cfg.num_workers or os.cpu_count() or 1
    with atomic_path(out_dir) as build_dir:
        build_dir.mkdir()
        spool = _Spool(build_dir / "spool")
        try:
            stats, filters, dedup_removed, samples = _collect(cfg, spool, workers)
        finally:
            spool.close()
        tokenizer = _tokenizer(cfg, given_tokenizer, spool, build_dir / "tokenizer")
        fast, encoder = _choose_encoder(cfg, tokenizer, spool)
        task = _EncodeTask(str(build_dir / "tokenizer"), fast)
        splits = {split: _write_split(cfg, split, spool, build_dir, tokenizer.vocab_size, task, workers, stats)
                  for split in SPLITS}
        shutil.rmtree(spool.root)
        warnings = validation_warnings(splits["val"], cfg.val_fraction)
        atomic_write_text(build_dir / "samples.txt", _format_samples(cfg, samples))
        atomic_write_json(build_dir / "meta.json", {
            "format": DATASET_FORMAT, "dtype": str(shard_dtype(tokenizer.vocab_size)),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "tokenizer_dir": str((out_dir / "tokenizer").resolve()), "encoder": encoder,
            "splits": splits, "sources": {s.name: stats[i].to_json() for i, s in enumerate(cfg.sources)},
            "filters": filters, "dedup": dedup_removed, "warnings": warnings,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": config_to_dict(cfg)})
    train = splits["train"]
    print(f"lmforge data prepare: {out_dir}: {train['documents']} train documents, {train['tokens']} tokens, "
          f"{splits['val']['documents']} val documents, {splits['val']['tokens']} tokens", flush=True)
    for warning in warnings:
        print(f"lmforge data prepare: warning: {warning}", flush=True)
    return out_dir


MIN_VAL_TOKENS = 1025  # one window of a 1024-token context


def validation_warnings(val: dict[str, Any], val_fraction: float) -> list[str]:
    """What makes validation silently disappear later: no val documents, or fewer tokens than one sequence."""
    if val["documents"] == 0:
        return [f"the val split is empty (val_fraction={val_fraction} of too few documents): training will report "
                "no validation loss; use a larger corpus or --val_fraction"]
    if val["tokens"] < MIN_VAL_TOKENS:
        return [f"the val split has only {val['tokens']} tokens: a model with a context of {val['tokens']} tokens "
                "or more gets no validation loss; use a larger corpus or --val_fraction"]
    return []


def _validate(cfg: DataConfig) -> Optional[Tokenizer]:
    """Check the config, the output dir and the sources before any corpus is read; return the given tokenizer."""
    if not cfg.sources:
        raise ConfigError("data: give at least one source (--sources wordnet or --sources data/*.txt)")
    if not cfg.out_dir:
        raise ConfigError("data: give an output directory (--out_dir)")
    names = [s.name for s in cfg.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: source names must be distinct, got {names} (set name=...)")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.batch_documents < 1 or cfg.shard_tokens < 1 or cfg.num_workers < 0:
        raise ConfigError("data: batch_documents and shard_tokens must be >= 1, num_workers >= 0")
    if cfg.tokenizer is None and cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"data.vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                          f"{MIN_VOCAB_SIZE - 256} special tokens), got {cfg.vocab_size}")
    check_replaceable_dir(cfg.out_dir, "meta.json", "dataset dir")
    out_dir = Path(cfg.out_dir).resolve()
    for source in cfg.sources:
        if source.kind == "corpus":
            continue
        for file in source_files(source):  # also the fail-fast check: a missing path or empty glob is a DataError
            if file.resolve().is_relative_to(out_dir):
                raise ConfigError(f"source {source.path}: {file} is inside the output dir {cfg.out_dir}, which "
                                  "is replaced; choose an --out_dir outside the sources")
    return Tokenizer.load(cfg.tokenizer) if cfg.tokenizer is not None else None


class _Spool:
    """Temp files of kept documents, one per (split, mixture pass): records of the source index (uint32) and the
    text's length in bytes (uint64), little-endian, then the text's UTF-8 bytes. Binary rather than JSON lines:
    every document passes through the one main process, where json.dumps and a text-mode write cost ~40 us each."""

    HEADER = struct.Struct("<IQ")

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self._files: dict[tuple[str, int], Any] = {}

    def write(self, split: str, copy: int, source_index: int, text: str) -> None:
        if (split, copy) not in self._files:
            self._files[split, copy] = open(self.root / f"{split}_{copy}.bin", "wb")
        data = text.encode("utf-8", "surrogatepass")
        self._files[split, copy].write(self.HEADER.pack(source_index, len(data)) + data)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def read(self, split: str) -> Iterator[tuple[int, str]]:
        """Documents of a split in write order, pass after pass."""
        size = self.HEADER.size
        for copy in range(sum(1 for s, _ in self._files if s == split)):
            with open(self.root / f"{split}_{copy}.bin", "rb") as f:
                while header := f.read(size):
                    source_index, length = self.HEADER.unpack(header)
                    yield source_index, f.read(length).decode("utf-8", "surrogatepass")


def _split_of(text: str, val_fraction: float) -> str:
    """'val' for a stable pseudo-random val_fraction of documents, by a hash of the text (`hash_fraction`)."""
    return "val" if hash_fraction(text, val_fraction) else "train"


class _CleanTask:
    """Worker task of pass 1: per document (UTF-8 bytes, clean result, dedup fingerprint or None, split or None):
    all that depends on the document alone, so the main process only deduplicates and writes."""

    def __init__(self, clean: CleanConfig, dedup: DedupConfig, val_fraction: float) -> None:
        self.clean = clean
        self.fingerprint = Fingerprinter(dedup)
        self.val_fraction = val_fraction

    def __call__(self, item: tuple[int, list[str]]) -> tuple[
            int, list[tuple[int, CleanResult, Fingerprint | None, str | None]]]:
        source_index, texts = item
        results = [clean_document(text, self.clean) for text in texts]
        kept = [result.text for result in results if result.text is not None]
        fingerprints = iter(self.fingerprint.batch(kept))  # one batch: see Fingerprinter
        out = []
        for text, result in zip(texts, results):
            kept_text = result.text is not None
            out.append((len(text.encode("utf-8")), result, next(fingerprints) if kept_text else None,
                        _split_of(result.text, self.val_fraction) if kept_text else None))
        return source_index, out


class _EncodeTask:
    """Pass-2 task: a batch of (source index, text) -> (source index and token count per document, UTF-8 bytes of
    the batch, ids): each document's ids followed by eos, concatenated, as uint32.

    With `fast` (a FastEncoder) it runs tiktoken; else it loads the tokenizer at `tokenizer_dir` on first use, once
    per worker process (the tokenizer is not pickled with the task)."""

    def __init__(self, tokenizer_dir: str, fast: Optional[FastEncoder] = None) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.fast = fast
        self._tokenizer: Optional[Tokenizer] = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tokenizer_dir": self.tokenizer_dir, "fast": self.fast, "_tokenizer": None}

    def __call__(self, batch: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        texts = [text for _, text in batch]
        sources = np.array([source_index for source_index, _ in batch], dtype=np.int64)
        joined = "".join(texts)  # one C-level pass instead of a Python loop: the GIL is the threads' bottleneck
        num_bytes = len(joined) if joined.isascii() else len(joined.encode("utf-8", "surrogatepass"))
        if self.fast is not None:
            ids = self.fast.encode_documents(texts)
            lengths = np.diff(np.flatnonzero(ids == self.fast.eos_id) + 1, prepend=0)  # eos ends each document
            return sources, lengths, num_bytes, ids
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_dir)
        encoded = self._tokenizer.encode_batch(texts, add_eos=True)
        lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        ids = np.fromiter((i for ids in encoded for i in ids), dtype=np.uint32, count=int(lengths.sum()))
        return sources, lengths, num_bytes, ids


_worker_task: Optional[Callable[[Any], Any]] = None  # set once per worker process by _init_worker


def _init_worker(task: Callable[[Any], Any]) -> None:
    global _worker_task
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (see _hold_sigint)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_task = task


def _run_worker(item: Any) -> Any:
    assert _worker_task is not None
    return _worker_task(item)


def _hold_sigint() -> Optional[tuple[set, Any]]:
    """Hold Ctrl-C while worker processes are started: block SIGINT in this process and ignore it, so that the
    workers start ignoring it (a spawned process keeps an ignored signal ignored, though not a blocked one); returns
    what _release_sigint restores (None off the main thread, which never handles signals).

    A terminal's Ctrl-C reaches every process of the group. A worker that raised KeyboardInterrupt while importing
    would print its traceback, and one that died holding a pool lock would hang Pool.terminate; the pool
    initializer ignores SIGINT again for workers started later. In this process the signal is blocked as well as
    ignored, and Linux keeps a blocked signal pending even when it is ignored: a Ctrl-C during the start is
    delivered when _release_sigint puts the handler back and unblocks it, never lost."""
    if threading.current_thread() is not threading.main_thread():
        return None
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    return mask, signal.signal(signal.SIGINT, signal.SIG_IGN)


def _release_sigint(held: Optional[tuple[set, Any]]) -> None:
    if held is not None:
        mask, handler = held
        signal.signal(signal.SIGINT, handler)  # the handler first: a pending signal is delivered to it on unblocking
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _ordered_map(task: Callable[[Any], Any], items: Iterable[Any], workers: int,
                 threads: bool = False) -> Iterator[Any]:
    """task(item) for each item, in order; when workers > 1, in `workers` threads (for a task that releases the
    GIL; at most 2 items in flight per thread) or else spawned processes. Close the iterator (`closing`) to stop
    the workers at once on an error or Ctrl-C in the consumer: processes are terminated, queued items dropped."""
    if workers <= 1:
        yield from map(task, items)
        return
    if threads:
        with ThreadPoolExecutor(workers) as executor:
            pending: deque = deque()
            try:
                for item in items:
                    pending.append(executor.submit(task, item))
                    if len(pending) >= 2 * workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:  # left only on an early exit: do not wait for queued batches
                    future.cancel()
        return
    # spawn, not fork: a forked child of a process whose tokenizers/torch threads are running can deadlock.
    held = _hold_sigint()
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (task,))
    except BaseException:
        _release_sigint(held)
        raise
    with pool:  # leaving it, normally or not, terminates the workers
        _release_sigint(held)  # a Ctrl-C pending since the start is raised here, where the pool is cleaned up
        yield from pool.imap(_run_worker, items)


def _batches(cfg: DataConfig) -> Iterator[tuple[int, list[str]]]:
    """(source index, texts) batches of every source in order; a batch never mixes sources."""
    for source_index, source in enumerate(cfg.sources):
        for batch in _chunks((doc.text for doc in source.documents(cfg.cache_dir)), cfg.batch_documents):
            yield source_index, batch


def _collect(cfg: DataConfig, spool: _Spool, workers: int) -> tuple[
        list[_SourceStats], dict[str, int], dict[str, int], dict[int, list[str]]]:
    """Pass 1: read, clean, dedup, split and sample every source into the spool; return the counts."""
    stats = [_SourceStats(weight=s.weight) for s in cfg.sources]
    samplers = [SourceSampler(s.weight, cfg.seed, s.name) for s in cfg.sources]
    dedup = Deduplicator(cfg.dedup)
    samples: dict[int, list[str]] = {i: [] for i in range(len(cfg.sources))}
    cleaned_batches = _ordered_map(_CleanTask(cfg.clean, cfg.dedup, cfg.val_fraction), _batches(cfg), workers)
    with closing(cleaned_batches):  # an error or Ctrl-C below stops the workers before the build dir is removed
        for source_index, results in cleaned_batches:
            st = stats[source_index]
            for raw_bytes, cleaned, fp, split in results:
                st.documents += 1
                st.bytes += raw_bytes
                # Drawn for every document read: a source's draws do not depend on cleaning, dedup or the split.
                copies = samplers[source_index].copies()
                removed_by = cleaned.removed_by or dedup.check(fp)
                if removed_by:
                    st.removed[removed_by] += 1
                    continue
                st.kept_documents += 1
                if len(samples[source_index]) < SAMPLES_PER_SOURCE:
                    samples[source_index].append(cleaned.text)
                if split == "val":
                    copies = 1
                for copy in range(copies):
                    spool.write(split, copy, source_index, cleaned.text)
                st.split_documents[split] += copies
    filters = {name: sum(st.removed[name] for st in stats) for name in FILTERS}
    dedup_removed = dict(dedup.removed)
    kept = sum(st.kept_documents for st in stats)
    if not kept:
        removals = ", ".join(f"{k} {v}" for k, v in {**filters, **dedup_removed}.items() if v)
        raise DataError(f"no documents left after cleaning and dedup: read {sum(st.documents for st in stats)}, "
                        f"removed by {removals or 'nothing'} (loosen the --clean.* thresholds or add data)")
    if not any(st.split_documents["train"] for st in stats):
        raise DataError(f"the training split is empty: of {kept} kept documents, none went to train "
                        f"(val_fraction {cfg.val_fraction}, weights {[s.weight for s in cfg.sources]})")
    return stats, filters, dedup_removed, samples


def _tokenizer(cfg: DataConfig, given: Optional[Tokenizer], spool: _Spool, tokenizer_dir: Path) -> Tokenizer:
    """The given tokenizer, or one trained on the spooled train split; saved into the dataset dir either way."""
    if given is not None:
        tokenizer = given
    else:
        print(f"lmforge data prepare: training a {cfg.vocab_size}-token BPE tokenizer on the train split", flush=True)
        tokenizer = Tokenizer.train((text for _, text in spool.read("train")), vocab_size=cfg.vocab_size)
    tokenizer.save(tokenizer_dir)
    return tokenizer


def _choose_encoder(cfg: DataConfig, tokenizer: Tokenizer, spool: _Spool) -> tuple[Optional[FastEncoder], dict]:
    """The FastEncoder for pass 2 (None: tokenizers) as cfg.encoder asks, and {library, why} for meta.json.

    The fast encoder is proven exact (see fast_encode.py); its ids are also compared with the tokenizer's on the
    first batch of each split, a guard against a change in either library."""
    def fall_back(why: str) -> tuple[None, dict]:
        if cfg.encoder == "tiktoken":
            raise ConfigError(f"data.encoder tiktoken: cannot encode exactly with tiktoken: {why}")
        if cfg.encoder == "auto":
            print(f"lmforge data prepare: encoding with tokenizers, not tiktoken: {why}", flush=True)
        return None, {"library": "tokenizers", "why": why}

    if cfg.encoder == "tokenizers":
        return fall_back("data.encoder is tokenizers")
    try:
        fast = fast_encoder(tokenizer)
    except UnsupportedTokenizer as exc:
        return fall_back(str(exc))
    for split in SPLITS:
        texts = [text for _, text in islice(spool.read(split), cfg.batch_documents)]
        expected = [i for ids in tokenizer.encode_batch(texts, add_eos=True) for i in ids]
        if fast.encode_documents(texts).tolist() != expected:
            return fall_back(f"tiktoken's ids differ from tokenizers' on the first {split} documents (please report)")
    return fast, {"library": "tiktoken", "why": "same ids as tokenizers: byte-level BPE with merge-ordered ids "
                                                "(lmforge/data/fast_encode.py)"}


def _write_split(cfg: DataConfig, split: str, spool: _Spool, build_dir: Path, vocab_size: int, task: _EncodeTask,
                 workers: int, stats: list[_SourceStats]) -> dict[str, Any]:
    """Pass 2 for one split: encode the spooled documents in batches and append them to shards."""
    writer = ShardWriter(build_dir, split, vocab_size, cfg.shard_tokens)
    documents = text_bytes = 0
    batches = _chunks(spool.read(split), cfg.batch_documents)
    encoded_batches = _ordered_map(task, batches, workers, threads=task.fast is not None)
    with closing(encoded_batches):
        for sources, lengths, num_bytes, ids in encoded_batches:
            writer.write(ids)
            for source_index in np.unique(sources):
                stats[source_index].split_tokens[split] += int(lengths[sources == source_index].sum())
            documents += len(lengths)
            text_bytes += num_bytes
    return {"shards": writer.close(), "tokens": writer.tokens, "documents": documents, "bytes": text_bytes}


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _format_samples(cfg: DataConfig, samples: dict[int, list[str]]) -> str:
    """A few cleaned documents per source, for a human to check what cleaning kept."""
    return "".join(f"### {cfg.sources[i].name}: document {j + 1}\n{text}\n\n"
                   for i, texts in samples.items() for j, text in enumerate(texts))
