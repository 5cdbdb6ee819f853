"""Shared test fixtures: deterministic English-like documents and a tiny prepared dataset built through the CLI."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest and keeps parallel CI jobs from fighting over cores

WORDS = ("the a river stone light garden window morning music letter forest quiet winter market paper silver "
         "mountain yellow station kitchen summer painter harbor evening bridge candle meadow village teacher "
         "orchard thunder basket lantern feather island pocket marble ribbon saddle tunnel walks sings opens "
         "carries finds under over near with from slowly brightly").split()


def fixture_texts(n: int, seed: int = 0) -> list[str]:
    """Distinct, already-clean documents of 12-40 words (clean_document leaves them unchanged)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 40))]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of 120 small text files (one document each)."""
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(fixture_texts(120, seed=7)):
        (root / f"doc_{i:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random lmforge model dir (LLaMA style, block 32) with a BPE tokenizer trained on a few sentences."""
    import torch

    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["the cat sat on the mat", "a dog is a friend", "héllo wörld"] * 20, vocab_size=300)
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=tok.vocab_size, block_size=32, d_model=32)).save(directory)
    tok.save(directory)
    return directory


def kill_after_checkpoint(command: str, config: Path, run_dir: Path, step: int, delay: float = 0.15,
                          pythonpath: tuple[str, ...] = ()) -> None:
    """Run `lmforge COMMAND --config CONFIG` in a subprocess whose steps are slowed by `delay` seconds, and SIGKILL
    it as soon as RUN_DIR/checkpoints/step_STEP exists (the crash of an exact-resume test)."""
    import os
    import signal
    import subprocess

    from test_train import REPO, subprocess_env

    driver = config.parent / f"driver-{command}.py"
    driver.write_text("import sys, time, torch\ntorch.set_num_threads(1)\nimport lmforge.train.loop as loop\n"
                      "from lmforge.cli import main\nreal = loop.lr_at\n"
                      f"loop.lr_at = lambda step, cfg: (time.sleep({delay}), real(step, cfg))[1]\n"
                      f"sys.exit(main([{command!r}, '--config', sys.argv[1]]))\n")
    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join([str(REPO), *pythonpath])}
    process = subprocess.Popen([sys.executable, str(driver), str(config)], env=env, cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_while_running((run_dir / "checkpoints" / f"step_{step}").exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()


def run_on_two_processes(command: str, config: Path, *extra: str, pythonpath: tuple[str, ...] = ()) -> None:
    """`lmforge COMMAND --config CONFIG EXTRA...` on 2 gloo processes under torchrun; fails showing its stderr
    unless it exits 0."""
    import os
    import subprocess

    from test_train import REPO, subprocess_env

    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join([str(REPO), *pythonpath])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "lmforge", command, "--config", str(config), *extra],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]


def wait_while_running(done, process, timeout: float = 90.0) -> None:
    """Poll `done()` until it is true; fail if `process` exits first (showing its stderr) or `timeout` passes."""
    import time

    deadline = time.monotonic() + timeout
    while not done():
        if process.poll() is not None:
            raise AssertionError(f"the process exited early: {process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat-ready base model dir (LLaMA style, block 64) whose tokenizer knows the SFT test pairs."""
    from lmforge.model import ModelConfig, Transformer
    from lmforge.tokenizer import Tokenizer

    from test_sft import PAIRS

    root = tmp_path_factory.mktemp("sftbase")
    texts = [f"{q} {a}" for q, a in PAIRS] + ["the cat sat on the mat", "a dog is a friend"]
    tok = Tokenizer.train(texts * 20, vocab_size=320)
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=tok.vocab_size, block_size=64, d_model=32)).save(root)
    tok.save(root)
    return root


TOY_REWARD = "toy_rewards:starts_with_letter"  # learnable from a random model: ~25% of its samples at first
TOY_MODULE = '''
def starts_with_letter(prompts, completions, answers):
    return [1.0 if c[:1].isalpha() else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def toy_rewards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dir holding the module of TOY_REWARD (an RL reward given as module:function), on sys.path for the
    module's tests; subprocesses get it through PYTHONPATH."""
    root = tmp_path_factory.mktemp("rewards")
    (root / "toy_rewards.py").write_text(TOY_MODULE)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RL prompts with answers: the SFT test pairs, six times over."""
    from test_sft import PAIRS

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in PAIRS * 6))
    return path
