"""llama.cpp beside lmforge, for tests/test_gguf.py and bench/bench_llamacpp.py: node-llama-cpp (its prebuilt CPU
build) installed once by npm into a cache dir, and driven through the JSON-lines server tests/llamacpp_probs.mjs.

The install goes to $LMFORGE_CACHE/node/node-llama-cpp-VERSION (else ~/.cache/lmforge/node/...), written to a temp
dir and renamed into place, so it is either complete or absent. Only the prebuilt binaries of this platform are
installed (`--omit=optional` plus the one platform package: ~85 MB instead of ~725 MB with every GPU build), and
install scripts are skipped, so nothing is ever compiled: the server asks for `build: "never"`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

NODE_LLAMA_CPP_VERSION = "3.22.1"  # bundles llama.cpp release v0.5.0 of ggml-org/llama.cpp (its binaries' metadata)
SERVER = Path(__file__).resolve().with_name("llamacpp_probs.mjs")
_PLATFORM_PACKAGES = {("Linux", "x86_64"): "linux-x64", ("Linux", "aarch64"): "linux-arm64",
                      ("Darwin", "arm64"): "mac-arm64-metal", ("Darwin", "x86_64"): "mac-x64",
                      ("Windows", "AMD64"): "win-x64"}


def install_dir() -> Path:
    cache = Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
    return cache / "node" / f"node-llama-cpp-{NODE_LLAMA_CPP_VERSION}"


def install_node_llama_cpp(timeout_s: float = 600) -> tuple[Optional[Path], str]:
    """(the install dir, "") once node-llama-cpp is installed there (installing it on the first call), or
    (None, why not) when node or npm is missing or the install fails."""
    target = install_dir()
    if (target / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return target, ""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return None, f"{tool} is not on PATH (node-llama-cpp needs Node.js >= 20 and npm)"
    packages = [f"node-llama-cpp@{NODE_LLAMA_CPP_VERSION}"]
    system = _PLATFORM_PACKAGES.get((platform.system(), platform.machine()))
    omit = ["--omit=optional"] if system else []
    if system:
        packages.append(f"@node-llama-cpp/{system}@{NODE_LLAMA_CPP_VERSION}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (tmp / "package.json").write_text('{"private": true}\n')
        start = time.perf_counter()
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", *omit, *packages],
                              cwd=tmp, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            return None, f"npm install {' '.join(packages)} failed: {_npm_reason(done.stderr or done.stdout)}"
        if target.exists():  # another process finished first
            return target, ""
        os.replace(tmp, target)
        print(f"installed {' '.join(packages)} into {target} in {time.perf_counter() - start:.0f} s")
        return target, ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"npm install {' '.join(packages)} failed: {exc}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _npm_reason(output: str) -> str:
    """The line of npm's error output that says what went wrong (not its code, errno or stack lines)."""
    lines = [line.removeprefix("npm error").strip() for line in output.splitlines() if line.startswith("npm error")]
    noise = ("code ", "errno ", "syscall ", "at ", "A complete")
    useful = [line for line in lines if line and not line.startswith(noise)]
    return (useful or lines or ["no output"])[0]


class LlamaCppError(RuntimeError):
    """llama.cpp (the node server) answered an error."""


class LlamaCpp:
    """One node process running llama.cpp on the CPU; see tests/llamacpp_probs.mjs for the requests."""

    def __init__(self, node_dir: Path, threads: int = 1) -> None:
        self.threads = threads
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen(["node", str(SERVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, text=True,
                                         env={**os.environ, "NODE_LLAMA_CPP_DIR": str(node_dir)})
        self.vocab_size = 0

    def request(self, **request: Any) -> dict:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise LlamaCppError(f"the llama.cpp server exited: {self._stderr.read()[-2000:]}")
        answer = json.loads(line)
        if "error" in answer:
            raise LlamaCppError(answer["error"])
        return answer

    def init(self) -> dict:
        """Load llama.cpp's binaries (no model): fails where the prebuilt build cannot run."""
        return self.request(op="init", threads=self.threads)

    def load(self, model_path: str | os.PathLike, context_size: int, vocab_size: int, kv_type: str = "F32") -> dict:
        """Load a GGUF file with a fresh context of context_size tokens and a `kv_type` (F32 | F16) KV cache.
        Requests must stay below context_size tokens: node-llama-cpp shifts a full context (drops its start)."""
        self.vocab_size = vocab_size
        return self.request(op="load", model=str(model_path), contextSize=context_size, threads=self.threads,
                            kvType=kv_type)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """(T, V) float64: llama.cpp's next-token logits after each prefix of token_ids."""
        rows = self.request(op="logits", tokens=list(token_ids), vocabSize=self.vocab_size)["logits"]
        return torch.tensor(rows, dtype=torch.float64)

    def generate(self, token_ids: list[int], new_tokens: int) -> tuple[list[int], float]:
        """Greedy ids of exactly new_tokens tokens after token_ids, and the seconds llama.cpp took."""
        answer = self.request(op="generate", tokens=list(token_ids), n=new_tokens)
        return answer["tokens"], answer["seconds"]

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's token ids of `text` (special-token strings as plain text)."""
        return self.request(op="tokenize", text=text)["tokens"]

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.write('{"op": "exit"}\n')
                self._process.stdin.flush()
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._stderr.close()

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
