"""The evaluation harness: k-shot prompting (plain or chat), log-likelihood multiple choice, greedy generation
scored by exact match, chrF and BLEU, and perplexity / bits per byte.

    config.py      EvalConfig (no torch import: `lmforge eval --help` stays fast)
    harness.py     run_eval: tasks -> prompts -> scores -> table and JSON report
    prompts.py     the plain and chat formats, k-shot selection, chat=auto detection
    loglik.py      batched log-likelihood of continuations and token streams
    metrics.py     exact match, chrF, BLEU, acc / acc_norm
    perplexity.py  nats/token, perplexity and bits per byte of a text file or a dataset dir
"""

from lmforge.eval.config import EvalConfig
from lmforge.eval.harness import run_eval

__all__ = ["EvalConfig", "run_eval"]
