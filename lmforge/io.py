"""Atomic writes: a file or directory is either complete on disk or absent, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it onto `path` (file or directory).

    Any previous content at `path` is replaced only after the new content is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover_leftovers(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftovers(path: Path, kind: str) -> Iterator[tuple[Path, int]]:
    """(sibling, pid) for each `.{name}.{kind}-PID` beside `path`."""
    prefix = f".{path.name}.{kind}-"
    if not path.parent.is_dir():
        return
    for sibling in path.parent.iterdir():
        if sibling.name.startswith(prefix) and sibling.name[len(prefix):].isdigit():
            yield sibling, int(sibling.name[len(prefix):])


def _recover_leftovers(path: Path) -> None:
    """Clean up after an `atomic_path` whose process was killed: put back a target it had moved aside
    (`.{name}.old-PID` with `path` missing: killed between the two renames) and delete its temp files/dirs."""
    dead = lambda pid: pid != os.getpid() and not _pid_alive(pid)  # noqa: E731
    if not path.exists():
        olds = sorted((p for p, pid in _leftovers(path, "old") if dead(pid)), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], path)
    for kind in ("tmp", "old") if path.exists() else ("tmp",):
        for p, pid in _leftovers(path, kind):
            if dead(pid):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _json_object(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def dir_kind(path: str | os.PathLike) -> str | None:
    """Which kind of lmforge directory `path` is, from the files it holds (None for anything else):

    'run dir'        metrics.jsonl or checkpoints/, or a config.json of a training run (keys out_dir and train)
    'model dir'      config.json of an lmforge or Hugging Face model (lmforge_model or model_type), not a run dir
    'adapter dir'    adapter_config.json (PEFT's format) or lmforge_adapter.json
    'dataset dir'    meta.json (written by `lmforge data prepare`)
    'tokenizer dir'  tokenizer.json without a config.json
    'quickstart dir' nothing but data/, run/ and summary.json
    """
    path = Path(path)
    if not path.is_dir():
        return None
    config = _json_object(path / "config.json") if (path / "config.json").is_file() else {}
    if (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir() or {"out_dir", "train"} <= config.keys():
        return "run dir"
    if config.get("lmforge_model") or "model_type" in config:
        return "model dir"
    if (path / "adapter_config.json").is_file() or (path / "lmforge_adapter.json").is_file():
        return "adapter dir"
    if (path / "meta.json").is_file():
        return "dataset dir"
    if (path / "tokenizer.json").is_file() and not (path / "config.json").exists():
        return "tokenizer dir"
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    if names and names <= {"data", "run", "summary.json"}:
        return "quickstart dir"
    return None


def check_replaceable_dir(path: str | os.PathLike, marker: str, what: str,
                          inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse to let a command write or replace `path` unless it is missing, empty, or exactly the kind of dir the
    command writes (`what`, one of the kinds of `dir_kind`), and unless it holds none of the command's `inputs`.

    A dir of another lmforge kind is named as such ("runs/x is a run dir, not a model dir"); a foreign dir is named
    by the `marker` file it lacks. Anything refused is a one-line LmforgeError and nothing is touched.
    """
    from lmforge.errors import LmforgeError

    path = Path(path)
    target = path.resolve()
    for source in inputs:
        if source and (Path(source).resolve() == target or Path(source).resolve().is_relative_to(target)):
            raise LmforgeError(f"{path} holds this command's input {source}; choose another output dir")
    if not path.exists():
        return
    if not path.is_dir():
        raise LmforgeError(f"{path} exists and is not a {what} (not a directory); choose another output dir or "
                           "delete it")
    if not any(path.iterdir()):
        return
    kind = dir_kind(path)
    if kind == what or (kind is None and (path / marker).is_file()):
        return
    if kind is not None:
        raise LmforgeError(f"{path} is a {kind}, not a {what}; choose another output dir")
    raise LmforgeError(f"{path} exists and is not a {what} (no {marker}); choose another output dir or delete it")


def save_safetensors(tensors: dict, path: str | os.PathLike) -> None:
    """Write `tensors` (name -> contiguous tensor) as a safetensors file at `path`, atomically, with the mode any
    other file gets under the umask (safetensors itself creates its files 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_UMASK)


def load_safetensors(path: str | os.PathLike) -> dict:
    """Read a safetensors file into a dict of CPU tensors; a missing or corrupt file is a one-line LmforgeError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmforge.errors import LmforgeError

    if not Path(path).is_file():
        raise LmforgeError(f"weights file {path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LmforgeError(f"weights file {path}: not a readable safetensors file ({exc})") from None
