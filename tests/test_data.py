"""Sources, mixture, shards and `prepare_dataset` end to end (lmforge.data)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import build_config
from lmforge.data.mixture import SourceSampler, effective_epochs
from lmforge.data.prepare import DataConfig, _split_of, prepare_dataset
from lmforge.data.shards import ShardWriter, TokenShards, read_meta, shard_dtype
from lmforge.data.sources import SourceConfig
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.tokenizer import Tokenizer

from conftest import fixture_texts

def docs(source: SourceConfig) -> list[str]:
    return [d.text for d in source.documents()]


# ---- sources -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("wordnet", dict(path="wordnet", kind="corpus", weight=1.0, name="wordnet")),
    ("kjv:2.0", dict(path="kjv", kind="corpus", weight=2.0)),
    ("data/*.txt", dict(path="data/*.txt", kind="auto", weight=1.0)),
    ("docs.jsonl:field=body:weight=0.5", dict(path="docs.jsonl", field="body", weight=0.5)),
    ("books:split=paragraph:name=b:max_documents=7", dict(split="paragraph", name="b", max_documents=7)),
])
def test_source_shorthand(spec: str, expected: dict) -> None:
    source = SourceConfig.from_str(spec)
    assert {k: getattr(source, k) for k in expected} == expected


@pytest.mark.parametrize("spec, message", [
    ("a.txt:colour=red", "unknown option 'colour'"), ("a.txt:weight=x", "expects a number"),
    ("nope:kind=corpus", "unknown corpus 'nope'"), ("a.txt:-1", "weight must be >= 0"),
    ("a.txt:split=lines", "split must be"),
])
def test_source_shorthand_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SourceConfig.from_str(spec)


def test_sources_from_config_dict_and_cli_list() -> None:
    cfg = build_config(DataConfig, {"sources": "a.txt:2,b.jsonl:field=body", "out_dir": "x"})
    assert [(s.path, s.weight, s.field) for s in cfg.sources] == [("a.txt", 2.0, "text"), ("b.jsonl", 1.0, "body")]
    cfg = build_config(DataConfig, {"sources": [{"path": "c.parquet", "field": "content", "weight": 0.5}]})
    assert cfg.sources[0].field == "content" and cfg.sources[0].weight == 0.5



def test_sources_help_shows_the_spec_format_keys_and_corpora() -> None:
    from lmforge.config import flat_fields
    from lmforge.data.corpora import CORPORA
    from lmforge.data.sources import _OPTION_TYPES

    help_text = {key: comment for key, _, _, comment in flat_fields(DataConfig)}["sources"]
    assert help_text.startswith("PATH_OR_CORPUS[:WEIGHT][:key=value]...") and "SourceConfig" not in help_text
    keys = help_text.split("keys: ", 1)[1].split(";", 1)[0].split(", ")
    corpora = help_text.split("corpora: ", 1)[1].split(", ")
    assert keys == list(_OPTION_TYPES) and corpora == list(CORPORA)


def test_misspelt_source_option_and_corpus_name_suggest_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        SourceConfig.from_str("wordnet:wieght=2")
    assert str(error.value) == ("source 'wordnet:wieght=2': unknown option 'wieght' (known: weight, name, kind, "
                                "field, max_documents, split; did you mean weight?)")
    with pytest.raises(ConfigError, match=r"unknown corpus 'wordnt' \(built-in corpora: .*; did you mean wordnet\?\)"):
        SourceConfig.from_str("wordnt:kind=corpus")
    with pytest.raises(DataError) as error:
        SourceConfig("wordnt").check()
    assert str(error.value) == ("unknown source 'wordnt': no such file or directory, and not a built-in corpus "
                                "(built-in: wordnet, kjv, gcide, pydocs, stdlib-docstrings; did you mean wordnet?)")
    for path in ("wordnt.txt", str(tmp_path / "wordnt")):  # a file suffix or a '/': plainly a path
        with pytest.raises(DataError, match=r"wordnt(\.txt)?: no such file or directory$"):
            SourceConfig(path).check()

def test_text_file_paragraphs_dir_and_glob(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.txt").write_text("first para\nline two\n\n\nsecond para\n")
    (tmp_path / "sub" / "b.md").write_text("bee")
    (tmp_path / ".hidden" / "c.txt").write_text("skipped")
    assert docs(SourceConfig(str(tmp_path / "a.txt"))) == ["first para\nline two\n\n\nsecond para\n"]
    assert docs(SourceConfig(str(tmp_path / "a.txt"), split="paragraph")) == ["first para\nline two\n",
                                                                               "second para\n"]
    assert docs(SourceConfig(str(tmp_path))) == ["first para\nline two\n\n\nsecond para\n", "bee"]
    assert docs(SourceConfig(str(tmp_path / "**" / "*.md"))) == ["bee"]
    assert docs(SourceConfig(str(tmp_path / "*.txt"), split="paragraph", max_documents=1)) == ["first para\nline two\n"]


def test_jsonl_field_and_parquet_column(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n')
    assert docs(SourceConfig.from_str(f"{jsonl}:field=body")) == ["one", "two"]
    table = pa.table({"id": [1, 2, 3], "content": ["alpha", None, "gamma"]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    assert docs(SourceConfig.from_str(f"{tmp_path / 'd.parquet'}:field=content")) == ["alpha", "gamma"]


def test_source_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.txt").write_bytes(b"ok text \xff\xfe more")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    cases = [
        (SourceConfig(str(tmp_path / "missing.txt")), r"missing.txt: no such file"),
        (SourceConfig(str(tmp_path / "*.csv")), r"matches no files"),
        (SourceConfig(str(tmp_path / "empty.txt")), r"empty.txt: empty file"),
        (SourceConfig(str(tmp_path / "bad.txt")), r"bad.txt: invalid UTF-8 at byte offset 8"),
        (SourceConfig(str(tmp_path / "bad.txt"), split="paragraph"), r"byte offset 8"),
        (SourceConfig(str(tmp_path / "bad.jsonl")), r"bad.jsonl:2: invalid JSON"),
        (SourceConfig(str(tmp_path / "nofield.jsonl")), r"nofield.jsonl:1: no string field 'text' \(keys: body\)"),
        (SourceConfig(str(tmp_path / "d.parquet")), r"no column 'text' \(columns: body\)"),
    ]
    for source, message in cases:
        with pytest.raises(DataError, match=message):
            source.check()
            docs(source)


# ---- mixture and shards ------------------------------------------------------------------------------------

def test_mixture_weights() -> None:
    def draws(weight: float, seed: int = 0, name: str = "s") -> list[int]:
        sampler = SourceSampler(weight, seed, name)
        return [sampler.copies() for _ in range(4000)]

    assert set(draws(2.0)) == {2} and set(draws(0.0)) == {0} and set(draws(1.0)) == {1}
    assert abs(np.mean(draws(0.5)) - 0.5) < 0.03
    assert abs(np.mean(draws(2.25)) - 2.25) < 0.03 and set(draws(2.25)) == {2, 3}
    assert draws(0.5) == draws(0.5) and draws(0.5) != draws(0.5, seed=1) and draws(0.5) != draws(0.5, name="t")
    assert effective_epochs(30, 10) == 3.0 and effective_epochs(0, 0) == 0.0


def test_shard_writer_and_reader_across_boundaries(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", vocab_size=1000, shard_tokens=7)
    ids = np.arange(30) % 1000
    writer.write(ids[:3])
    writer.write(ids[3:25])
    writer.write(ids[25:])
    shards = writer.close()
    assert shards == [f"train_{i:06d}.bin" for i in range(5)] and writer.tokens == 30
    assert (tmp_path / "train_000004.bin").stat().st_size == 2 * 2  # two uint16 tokens in the last shard
    meta = {"format": "lmforge-dataset-v1", "dtype": "uint16", "splits": {"train": {"shards": shards}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    reader = TokenShards(tmp_path, "train")
    assert len(reader) == 30
    assert reader.read(5, 20).tolist() == list(range(5, 25)) and reader.read(0, 30).tolist() == list(range(30))
    assert shard_dtype(65535) == np.uint16 and shard_dtype(65536) == np.uint32
    with pytest.raises(ValueError, match="outside"):
        ShardWriter(tmp_path, "val", vocab_size=10).write([3, 10])


# ---- prepare end to end ------------------------------------------------------------------------------------

def write_corpus(root: Path) -> tuple[list[str], list[str]]:
    """A text dir (one file per document, plus junk to filter) and a JSONL file with a 'body' field."""
    texts_a, texts_b = fixture_texts(40, seed=1), fixture_texts(20, seed=2)
    (root / "a").mkdir(parents=True)
    for i, text in enumerate(texts_a):
        (root / "a" / f"{i:03d}.txt").write_text(text)
    (root / "a" / "x_short.txt").write_text("tiny")
    (root / "a" / "x_dup.txt").write_text(texts_a[0].upper())
    with open(root / "b.jsonl", "w") as f:
        for text in texts_b:
            f.write(json.dumps({"body": text, "id": 0}) + "\n")
    return texts_a, texts_b


def data_config(root: Path, out: str, **kwargs) -> DataConfig:
    sources = [SourceConfig(str(root / "a"), name="a"), SourceConfig(str(root / "b.jsonl"), name="b", field="body",
                                                                     weight=2.0)]
    return DataConfig(**{"sources": sources, "out_dir": str(root / out), "vocab_size": 300, "val_fraction": 0.2,
                         "num_workers": 1, "shard_tokens": 500, **kwargs})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    texts_a, texts_b = write_corpus(root)
    return root, prepare_dataset(data_config(root, "ds")), texts_a, texts_b


def test_prepare_meta_and_exact_token_readback(prepared) -> None:
    root, out, texts_a, texts_b = prepared
    meta = read_meta(out)
    tok = Tokenizer.load(out / "tokenizer")
    assert meta["vocab_size"] == tok.vocab_size <= 300 and meta["dtype"] == "uint16"
    assert meta["eos_id"] == tok.eos_id and meta["tokenizer_fingerprint"] == tok.fingerprint
    assert meta["tokenizer_dir"] == str((out / "tokenizer").resolve())
    assert meta["filters"]["min_chars"] == 1 and meta["dedup"] == {"exact": 1, "near": 0}
    a, b = meta["sources"]["a"], meta["sources"]["b"]
    assert (a["documents"], a["kept_documents"], b["documents"], b["kept_documents"]) == (42, 40, 20, 20)
    assert a["removed"] == {"min_chars": 1, "exact": 1} and b["weight"] == 2.0

    train_a = [t for t in texts_a if _split_of(t, 0.2) == "train"]
    train_b = [t for t in texts_b if _split_of(t, 0.2) == "train"]
    val = [t for t in texts_a + texts_b if _split_of(t, 0.2) == "val"]
    assert 0 < len(val) < 30 and b["epochs"] == 2.0 and a["epochs"] == 1.0
    # Pass 0 holds every train document once, pass 1 the second copy of source b's (weight 2.0).
    for split, expected in (("train", train_a + train_b + train_b), ("val", val)):
        ids = [i for t in expected for i in tok.encode(t) + [tok.eos_id]]
        reader = TokenShards(out, split)
        assert reader.read(0, len(reader)).tolist() == ids
        info = meta["splits"][split]
        assert info["tokens"] == len(ids) and info["documents"] == len(expected)
        assert info["bytes"] == sum(len(t.encode()) for t in expected)
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert a["train_tokens"] + b["train_tokens"] == meta["splits"]["train"]["tokens"]
    assert "### a: document 1\n" in (out / "samples.txt").read_text()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == ["meta.json", "samples.txt",
                                                                                     "tokenizer"]


def test_parallel_output_identical_and_given_tokenizer(prepared) -> None:
    root, out, _, _ = prepared
    parallel = prepare_dataset(data_config(root, "ds_parallel", num_workers=2, batch_documents=8,
                                           tokenizer=str(out / "tokenizer")))
    meta, meta_parallel = read_meta(out), read_meta(parallel)
    for key in ("splits", "sources", "filters", "dedup", "tokenizer_fingerprint"):
        assert meta[key] == meta_parallel[key]
    for name in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]:
        assert (out / name).read_bytes() == (parallel / name).read_bytes()


def test_prepare_stdlib_docstrings(tmp_path: Path) -> None:
    cfg = DataConfig(sources=[SourceConfig.from_str("stdlib-docstrings:max_documents=200")],
                     out_dir=str(tmp_path / "ds"), vocab_size=300, num_workers=1)
    meta = read_meta(prepare_dataset(cfg))
    source = meta["sources"]["stdlib-docstrings"]
    assert source["documents"] == 200 and source["kept_documents"] >= 120
    assert sum(meta["filters"].values()) + sum(meta["dedup"].values()) == 200 - source["kept_documents"]
    assert meta["splits"]["train"]["tokens"] > 1000


def test_failed_prepare_leaves_existing_dataset_intact(prepared, tmp_path: Path) -> None:
    root, out, _, _ = prepared
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_bytes(b"\xc3\x28 broken")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "short.txt").write_text("hi")
    cases = [("missing.txt", "no such file"), ("empty.txt", "empty file"),
             ("bad.txt", "invalid UTF-8 at byte offset 0"), ("bad.jsonl", r"bad.jsonl:1: invalid JSON"),
             ("short.txt", "no documents left.*min_chars 1")]
    for name, message in cases:
        cfg = data_config(root, "ds", sources=[SourceConfig(str(tmp_path / name))])
        with pytest.raises(DataError, match=message):
            prepare_dataset(cfg)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ds")]  # no temp dirs left behind


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one source"):
        prepare_dataset(DataConfig(out_dir=str(tmp_path / "x")))
    with pytest.raises(ConfigError, match="distinct"):
        prepare_dataset(DataConfig(sources=[SourceConfig("kjv"), SourceConfig("kjv")], out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="vocab_size must be at least 271"):
        prepare_dataset(DataConfig(sources=[SourceConfig("kjv")], out_dir=str(tmp_path / "x"), vocab_size=270))


def test_prepare_never_replaces_a_dir_that_is_not_a_dataset(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(fixture_texts(1, seed=3)[0])
    sources = [SourceConfig(str(data / "*.txt"))]
    with pytest.raises(LmforgeError, match=r"data exists and is not a dataset dir \(no meta.json\); choose another"):
        prepare_dataset(DataConfig(sources=sources, out_dir=str(data), num_workers=1))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "meta.json").write_text("{}")  # a dataset dir, but the source lives inside it
    (tmp_path / "ds" / "b.txt").write_text("text")
    with pytest.raises(ConfigError, match=r"b.txt is inside the output dir"):
        prepare_dataset(DataConfig(sources=[SourceConfig(str(tmp_path / "ds"))], out_dir=str(tmp_path / "ds"),
                                   num_workers=1))
    assert sorted(p.name for p in data.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["b.txt", "meta.json"]


def test_missing_tokenizer_fails_before_the_corpus_is_read(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"\xc3\x28 broken")  # would fail only when read
    cfg = DataConfig(sources=[SourceConfig(str(tmp_path / "bad.txt"))], out_dir=str(tmp_path / "ds"),
                     tokenizer=str(tmp_path / "tokenzier"), num_workers=1)
    with pytest.raises(DataError, match="tokenzier: not found"):
        prepare_dataset(cfg)


def test_mixture_draw_is_made_for_every_document_read(prepared) -> None:
    root, out, texts_a, _ = prepared
    cfg = data_config(root, "ds_half", tokenizer=str(out / "tokenizer"),
                      sources=[SourceConfig(str(root / "a"), name="a", weight=0.5)])
    meta = read_meta(prepare_dataset(cfg))
    sampler = SourceSampler(0.5, cfg.seed, "a")
    draws = [sampler.copies() for _ in range(42)]  # 40 documents, then x_dup.txt and x_short.txt (removed)
    expected = sum(d for d, t in zip(draws, texts_a) if _split_of(t, 0.2) == "train")
    assert meta["sources"]["a"]["train_documents"] == expected


def _process_group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of group `pgid` remains (read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _default_sigint() -> None:
    """In the child before exec: SIGINT to its default, as in a terminal. A test run started as a background job of
    a non-interactive shell (`cmd &`) inherits SIGINT ignored, and an ignored SIGINT stays ignored in the child,
    rightly: lmforge then never sees the Ctrl-C this test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("wait_for", ["build dir", "first spooled document"])
def test_ctrl_c_stops_cleanly(tmp_path: Path, wait_for: str) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while worker processes clean documents:
    one line on stderr, exit code 130, workers gone, no temp dir, the existing dataset untouched."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = fixture_texts(20_000, seed=11)  # about 8 s of work on 2 cores
    for i in range(4):
        (corpus / f"part_{i}.txt").write_text("\n\n".join(texts[i::4]) + "\n", encoding="utf-8")
    out = tmp_path / "ds"
    out.mkdir()
    existing = {"meta.json": b"{}", "train_000000.bin": b"\x01\x02"}  # an earlier dataset: must survive as it is
    for name, data in existing.items():
        (out / name).write_bytes(data)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "data", "prepare", "--sources",
                             f"{corpus}:split=paragraph", "--out_dir", str(out), "--vocab_size", "300",
                             "--num_workers", "2"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_default_sigint)
    build_dir = tmp_path / f".ds.tmp-{proc.pid}"
    started = build_dir if wait_for == "build dir" else build_dir / "spool" / "train_0.bin"
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, f"{started} never appeared"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # hung: do not leave it running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and len(stderr.splitlines()) <= 2, stderr
    assert "interrupted" in stderr
    deadline = time.monotonic() + 10
    while _process_group_alive(proc.pid):  # the workers, too, are gone
        assert time.monotonic() < deadline, "worker processes outlived the interrupted run"
        time.sleep(0.05)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == existing


def test_missing_or_short_validation_is_a_warning_in_meta(tmp_path, capsys) -> None:
    write_corpus(tmp_path)
    out = prepare_dataset(data_config(tmp_path, "noval", val_fraction=0.0))
    meta = read_meta(out)
    assert meta["splits"]["val"]["documents"] == 0 and "the val split is empty" in meta["warnings"][0]
    assert "warning: the val split is empty" in capsys.readouterr().out
    short = read_meta(prepare_dataset(data_config(tmp_path, "short", val_fraction=0.1)))
    assert 0 < short["splits"]["val"]["tokens"] < 1025
    assert short["warnings"] == [f"the val split has only {short['splits']['val']['tokens']} tokens: a model with "
                                 f"a context of {short['splits']['val']['tokens']} tokens or more gets no "
                                 "validation loss; use a larger corpus or --val_fraction"]
