"""Data preparation speed: lmforge's pass-2 encoding against a plain `tokenizers` encode_batch pipeline, one process.

    python bench/bench_data.py [--corpus wordnet] [--vocab-size 8192] [--repeats 3] [--max-mb 0] [--json results.jsonl]

One BPE vocabulary is trained with `Tokenizer.train` on the corpus (WordNet, else the standard library's docstrings
when WordNet cannot be fetched), then, alternating, on the same raw documents held in memory:
  plain tokenizers: `tokenizers.Tokenizer.encode_batch` over batches of 1,000 documents (all cores, its own thread
      pool; special-token text encoded as plain text, as lmforge does), eos appended, numpy uint16 concatenation,
      one .bin file written;
  lmforge: the pass-2 code of `lmforge data prepare` (`_EncodeTask` through `_ordered_map`, all cores) into a
      `ShardWriter` (10M-token shards, the default); every round builds the encoder and checks the vocabulary; the
      regex-engine check, once per process, is timed apart.
MB/s counts UTF-8 bytes of document text. Both files must hold the same ids (compared in full). Separately, the whole
`lmforge data prepare` command (a subprocess: read, clean, dedup, split, encode, shards, with the tokenizer given so
no training is timed) runs once with each encoder; MB/s there counts the raw bytes read, and the shards must be
byte-identical. On a shared machine figures move with the load, which is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken
import tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, emit  # noqa: E402

from lmforge.data.corpora import iter_corpus  # noqa: E402
from lmforge.data.fast_encode import fast_encoder, regex_engines_disagree  # noqa: E402
from lmforge.data.prepare import DataConfig, _chunks, _EncodeTask, _ordered_map  # noqa: E402
from lmforge.data.shards import ShardWriter  # noqa: E402
from lmforge.errors import DataError  # noqa: E402
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer  # noqa: E402


def load_documents(corpus: str, max_mb: float) -> tuple[str, list[str]]:
    """(corpus name, its raw documents up to max_mb MB of UTF-8; 0 = all); WordNet falls back to stdlib docstrings."""
    try:
        documents = iter_corpus(corpus)
    except DataError as exc:
        print(f"data: {corpus} unavailable ({exc}); using stdlib-docstrings")
        corpus, documents = "stdlib-docstrings", iter_corpus("stdlib-docstrings")
    texts, size = [], 0
    for doc in documents:
        if max_mb and size >= max_mb * 1e6:
            break
        texts.append(doc.text)
        size += len(doc.text.encode("utf-8"))
    return corpus, texts


def plain_tokenizers(tokenizer_dir: Path, texts: list[str], eos_id: int, out: Path) -> None:
    """The baseline: tokenizers' encode_batch in batches of 1,000, eos appended, uint16, one file."""
    hf = tokenizers.Tokenizer.from_file(str(tokenizer_dir / TOKENIZER_FILE))
    hf.encode_special_tokens = True  # documents' "<|eos|>" text is text, as in lmforge
    arrays = []
    for start in range(0, len(texts), 1000):
        for encoding in hf.encode_batch(texts[start:start + 1000], add_special_tokens=False):
            arrays.append(np.array(encoding.ids + [eos_id], dtype=np.uint16))
    np.concatenate(arrays).tofile(out)


def lmforge_encode(tokenizer: Tokenizer, tokenizer_dir: Path, texts: list[str], workers: int, out: Path) -> None:
    """Pass 2 of `lmforge data prepare` on `texts`: shards `out/train_*.bin` (10M tokens each, as by default)."""
    task = _EncodeTask(str(tokenizer_dir), fast_encoder(tokenizer))
    writer = ShardWriter(out, "train", tokenizer.vocab_size)
    batches = _chunks(((0, text) for text in texts), DataConfig.batch_documents)
    for _, _, _, ids in _ordered_map(task, batches, workers, threads=task.fast is not None):
        writer.write(ids)
    writer.close()


def prepare_command(corpus: str, documents: int, tokenizer_dir: Path, out_dir: Path, encoder: str) -> dict:
    """Run `lmforge data prepare` once; return its seconds, raw bytes read and meta.json."""
    cmd = [sys.executable, "-m", "lmforge", "data", "prepare", "--sources", f"{corpus}:max_documents={documents}",
           "--tokenizer", str(tokenizer_dir), "--out_dir", str(out_dir), "--encoder", encoder]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    meta = json.loads((out_dir / "meta.json").read_text())
    return {"seconds": seconds, "bytes": sum(s["bytes"] for s in meta["sources"].values()), "meta": meta}


def same_shards(a: Path, b: Path, meta_a: dict, meta_b: dict) -> bool:
    if meta_a["splits"] != meta_b["splits"] or meta_a["sources"] != meta_b["sources"]:
        return False
    names = meta_a["splits"]["train"]["shards"] + meta_a["splits"]["val"]["shards"]
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="wordnet", help="built-in corpus (see `lmforge data prepare --help`)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; figures are medians")
    parser.add_argument("--max-mb", type=float, default=0, help="use at most this many MB of text (0 = all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="lmforge encoding threads")
    parser.add_argument("--skip-prepare", action="store_true", help="skip the end-to-end `data prepare` runs")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args()

    corpus, texts = load_documents(args.corpus, args.max_mb)
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"data: {corpus}, {len(texts):,} documents, {text_mb:.2f} MB; training a {args.vocab_size}-token BPE")
    start = time.perf_counter()
    tokenizer = Tokenizer.train(texts, args.vocab_size)
    print(f"  tokenizer trained in {time.perf_counter() - start:.1f} s")
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root = Path(tmp)
        tokenizer.save(root / "tokenizer")
        plain_bin, lmforge_dir = root / "plain.bin", root / "lmforge"
        lmforge_dir.mkdir()
        start = time.perf_counter()
        regex_engines_disagree()  # once per process; cached for the rounds
        setup_seconds = time.perf_counter() - start
        load = os.getloadavg()[0]
        timings = alternate({
            "plain": lambda: plain_tokenizers(root / "tokenizer", texts, tokenizer.eos_id, plain_bin),
            "lmforge": lambda: lmforge_encode(tokenizer, root / "tokenizer", texts, args.workers, lmforge_dir),
        }, args.repeats)
        plain_ids = np.fromfile(plain_bin, dtype=np.uint16)
        lmforge_ids = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in sorted(lmforge_dir.glob("*.bin"))])
        identical = bool(np.array_equal(plain_ids, lmforge_ids))
        plain_mb_s, lmforge_mb_s = text_mb / timings.median("plain"), text_mb / timings.median("lmforge")
        ratio = timings.speedup("lmforge", "plain")
        print(f"  encode {len(plain_ids):,} tokens ({args.workers} cores, load average {load:.1f}): "
              f"plain tokenizers {plain_mb_s:.2f} MB/s   lmforge {lmforge_mb_s:.2f} MB/s   "
              f"ratio {ratio:.2f}x   identical ids: {identical}")
        print(f"  lmforge's regex-engine check, once per process (not in the rounds): {setup_seconds:.2f} s")
        result = {"benchmark": "data", "corpus": corpus, "documents": len(texts), "text_mb": round(text_mb, 3),
                  "vocab_size": args.vocab_size, "tokens": len(plain_ids), "repeats": args.repeats,
                  "workers": args.workers, "load_average": round(load, 2),
                  "plain_tokenizers_mb_s": round(plain_mb_s, 3), "lmforge_encode_mb_s": round(lmforge_mb_s, 3),
                  "ratio": round(ratio, 3), "identical_ids": identical,
                  "regex_check_s": round(setup_seconds, 3), "seconds": timings.seconds,
                  "tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__}
        if not args.skip_prepare:
            runs = {encoder: prepare_command(corpus, len(texts), root / "tokenizer", root / f"ds_{encoder}", encoder)
                    for encoder in ("auto", "tokenizers")}
            same = same_shards(root / "ds_auto", root / "ds_tokenizers", runs["auto"]["meta"],
                               runs["tokenizers"]["meta"])
            prepare = {encoder: round(run["bytes"] / 1e6 / run["seconds"], 3) for encoder, run in runs.items()}
            print(f"  lmforge data prepare end to end ({runs['auto']['bytes'] / 1e6:.2f} MB raw): encoder auto "
                  f"({runs['auto']['meta']['encoder']['library']}) {prepare['auto']:.2f} MB/s, encoder tokenizers "
                  f"{prepare['tokenizers']:.2f} MB/s   identical shards: {same}")
            result.update(prepare_mb_s=prepare, prepare_identical_shards=same)
    print(json.dumps(result))
    emit(result, args.json)


if __name__ == "__main__":
    main()
