"""Where documents come from: text files, directories, globs, JSONL, Parquet and built-in corpora.

Every source is read lazily, one document at a time, so a corpus never has to fit in memory.

Reading rules:
- `kind='auto'` picks the reader from the path: a built-in corpus name (see `lmforge.data.corpora.CORPORA`) that is
  not also an existing path -> corpus; `*.jsonl` / `*.ndjson` -> JSONL; `*.parquet` -> Parquet; anything else -> text.
  In a directory or a glob the choice is made per file.
- A directory is read recursively, files in sorted path order, skipping hidden files and folders (names starting
  with '.'). A glob (`data/*.txt`, `data/**/*.md`) is expanded with `**` recursion, in sorted order.
- Text files: `split='file'` (the default) makes each file one document; `split='paragraph'` makes each block of
  lines separated by one or more blank lines a document (streamed line by line; use it for large text files).
- JSONL: one JSON object per line; the document is the string at key `field`. Blank lines are skipped; a line
  that is not JSON, not an object, or lacks a string `field` is a DataError naming file:line.
- Parquet: the string column `field`, read in record batches; null values are skipped.
- A missing path, a glob that matches nothing, an empty file (no non-whitespace text) and invalid UTF-8 are
  DataErrors naming the file (and the byte offset of the first bad byte).
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from lmforge.data.corpora import CORPORA, Document, iter_corpus
from lmforge.errors import ConfigError, DataError

SourceKind = Literal["auto", "text", "jsonl", "parquet", "corpus"]
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_BATCH_ROWS = 1024


@dataclass
class SourceConfig:
    """One input of the data mixture.

    name: label used in meta.json (default: the path or corpus name). kind: see the module docstring.
    path: file, directory, glob, or built-in corpus name. field: JSONL key / Parquet column holding the text.
    weight: mixture weight (see `lmforge.data.mixture`). max_documents: stop after this many documents (0 = all).
    split: 'file' or 'paragraph', how text files are cut into documents.
    """

    path: str = ""  # file, directory, glob, or built-in corpus name
    name: str = ""  # label in meta.json (default: the path)
    kind: SourceKind = "auto"  # auto (by suffix) | text | jsonl | parquet | corpus
    field: str = "text"  # JSONL key / Parquet column holding the text
    weight: float = 1.0  # mixture weight: copies of each training document (see lmforge.data.mixture)
    max_documents: int = 0  # stop after this many documents (0 = all)
    split: Literal["file", "paragraph"] = "file"  # text files: one document per file or per paragraph

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("source needs a path or a built-in corpus name")
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.kind not in typing.get_args(SourceKind):
            raise ValueError(f"kind must be one of {', '.join(typing.get_args(SourceKind))}, got {self.kind!r}")
        if self.split not in ("file", "paragraph"):
            raise ValueError(f"split must be 'file' or 'paragraph', got {self.split!r}")
        if self.max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {self.max_documents}")
        if self.kind == "auto" and self.path in CORPORA and not os.path.exists(self.path):
            self.kind = "corpus"
        if self.kind == "corpus" and self.path not in CORPORA:
            raise ValueError(f"unknown corpus '{self.path}' "
                             f"(built-in corpora: {', '.join(CORPORA)}{_did_you_mean(self.path, CORPORA)})")
        if not self.name:
            self.name = self.path

    @classmethod
    def from_str(cls, spec: str) -> "SourceConfig":
        """Parse CLI shorthand: `PATH_OR_CORPUS[:WEIGHT][:key=value]...`.

        Examples: `wordnet`, `kjv:2.0`, `data/*.txt`, `docs.jsonl:field=body:weight=0.5`,
        `books/:split=paragraph:name=books:max_documents=1000`. Keys are the SourceConfig fields.
        """
        path, *options = spec.strip().split(":")
        kwargs: dict[str, object] = {"path": path}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep:
                key, value = "weight", option
            if key not in _OPTION_TYPES:
                raise ConfigError(f"source '{spec}': unknown option '{key}' "
                                  f"(known: {', '.join(_OPTION_TYPES)}{_did_you_mean(key, _OPTION_TYPES)})")
            try:
                kwargs[key] = _OPTION_TYPES[key](value)
            except ValueError:
                raise ConfigError(f"source '{spec}': option '{key}' expects a number, got {value!r}") from None
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(f"source '{spec}': {exc}") from None

    def check(self) -> None:
        """Fail fast (DataError) if the path does not exist or a glob matches no file."""
        if self.kind != "corpus":
            _files(self)

    def documents(self, cache_dir: str | None = None) -> Iterator[Document]:
        """Stream this source's documents, at most `max_documents` of them."""
        count = 0
        for doc in self._all_documents(cache_dir):
            yield doc
            count += 1
            if count == self.max_documents:
                return

    def _all_documents(self, cache_dir: str | None) -> Iterator[Document]:
        if self.kind == "corpus":
            yield from iter_corpus(self.path, cache_dir)
            return
        for path in _files(self):
            kind = self.kind if self.kind != "auto" else _kind_of(path)
            if kind == "jsonl":
                yield from read_jsonl(path, self.field)
            elif kind == "parquet":
                yield from read_parquet(path, self.field)
            else:
                yield from read_text(path, paragraphs=self.split == "paragraph")


_OPTION_TYPES = {"weight": float, "name": str, "kind": str, "field": str, "max_documents": int, "split": str}


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    """'; did you mean X?' for the choice closest to `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _kind_of(path: Path) -> SourceKind:
    if path.suffix in _JSONL_SUFFIXES:
        return "jsonl"
    return "parquet" if path.suffix == ".parquet" else "text"


def _files(source: SourceConfig) -> list[Path]:
    """The files of a path, directory or glob, in sorted order."""
    path = Path(source.path)
    if glob.has_magic(source.path):
        files = sorted(Path(p) for p in glob.glob(source.path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{_label(source)}glob {source.path} matches no files")
        return files
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p.relative_to(path)))
        if not files:
            raise DataError(f"{_label(source)}directory {path} holds no files")
        return files
    if source.kind == "auto" and "/" not in source.path and not path.suffix:  # a bare name: a misspelt corpus?
        raise DataError(f"{_label(source)}unknown source '{source.path}': no such file or directory, and not a "
                        f"built-in corpus (built-in: {', '.join(CORPORA)}{_did_you_mean(source.path, CORPORA)})")
    raise DataError(f"{_label(source)}{path}: no such file or directory")


source_files = _files  # public name: the files a non-corpus source reads, in order


def _label(source: SourceConfig) -> str:
    return "" if source.name == source.path else f"source '{source.name}': "


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _decode(data: bytes, path: Path, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: invalid UTF-8 at byte offset {offset + exc.start}") from None


def _empty(path: Path) -> DataError:
    return DataError(f"{path}: empty file (no text)")


def read_text(path: Path, paragraphs: bool = False) -> Iterator[Document]:
    """A text file as one document, or as blank-line-separated paragraph blocks (streamed)."""
    if not paragraphs:
        text = _decode(path.read_bytes(), path)
        if not text.strip():
            raise _empty(path)
        yield Document(text=text, source=str(path))
        return
    block: list[str] = []
    found = False
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            line = _decode(raw, path, offset)
            offset += len(raw)
            if line.strip():
                block.append(line)
            elif block:
                found = True
                yield Document(text="".join(block), source=str(path))
                block = []
    if block:
        found = True
        yield Document(text="".join(block), source=str(path))
    if not found:
        raise _empty(path)


def read_jsonl(path: Path, field: str) -> Iterator[Document]:
    """The string at key `field` of each JSON object line."""
    found = False
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            text = record.get(field)
            if not isinstance(text, str):
                keys = ", ".join(map(str, record)) or "none"
                raise DataError(f"{path}:{line_no}: no string field '{field}' (keys: {keys})")
            found = True
            yield Document(text=text, source=f"{path}:{line_no}")
    if not found:
        raise _empty(path)


def read_parquet(path: Path, column: str) -> Iterator[Document]:
    """The non-null strings of column `column`, streamed batch by batch."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({exc})".splitlines()[0]) from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column '{column}' (columns: {', '.join(names)})")
    found = False
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{path}: column '{column}' holds {type(text).__name__}, expected strings")
            found = True
            yield Document(text=text, source=str(path))
    if not found:
        raise _empty(path)
