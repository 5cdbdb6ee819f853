"""Verifiable rewards for RL on generated completions (GRPO): a reward is a function

    fn(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]

scoring each completion (the generated text, without the token that ended it) of its prompt against the prompt's
reference answer. Built-in names:

    arithmetic   1.0 when the first integer in the completion is exactly the answer, else 0.0
    format       1.0 when the completion is only an integer (optionally signed, surrounding spaces allowed), else 0.0
    digits       partial credit: the share of the answer's digits that the completion's first integer has in the same
                 place, counted from the units, over the longer of the two (1.0 exactly when arithmetic is 1.0)

Any other reward is a `module:function` path imported with importlib (the module must be importable: installed,
or on PYTHONPATH). Several rewards combine as a weighted sum.
"""

from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Sequence

from lmforge.errors import ConfigError, DataError

RewardFn = Callable[[list[str], list[str], list[str]], list[float]]

_INTEGER = re.compile(r"[+-]?\d+")
_ONLY_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


def arithmetic_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when the completion's first integer (a sign included) equals the answer as an integer, else 0.0."""
    scores = []
    for completion, answer in zip(completions, answers):
        found = _INTEGER.search(completion)
        scores.append(1.0 if found and _same_integer(found.group(), answer.strip()) else 0.0)
    return scores


def _same_integer(found: str, answer: str) -> bool:
    if not _ONLY_INTEGER.fullmatch(answer):
        return found == answer
    return int(found) == int(answer)


def format_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """1.0 when the completion is only an integer (e.g. '42', '-7', ' +3 '), else 0.0."""
    return [1.0 if _ONLY_INTEGER.fullmatch(completion) else 0.0 for completion in completions]


def digits_reward(prompts: list[str], completions: list[str], answers: list[str]) -> list[float]:
    """Digits of the answer matched in place (from the units) by the completion's first integer, divided by the
    longer length: '1234' for 1284 scores 3/4, '84' scores 2/4, '11284' scores 4/5; a sign must match too."""
    scores = []
    for completion, answer in zip(completions, answers):
        found = _INTEGER.search(completion)
        if not found or not _ONLY_INTEGER.fullmatch(answer):
            scores.append(0.0)
            continue
        got, want = found.group().lstrip("+"), answer.strip().lstrip("+")
        if got.startswith("-") != want.startswith("-"):
            scores.append(0.0)
            continue
        got, want = got.lstrip("-"), want.lstrip("-")
        same = sum(a == b for a, b in zip(reversed(got), reversed(want)))
        scores.append(same / max(len(got), len(want)))
    return scores


BUILTIN_REWARDS: dict[str, RewardFn] = {"arithmetic": arithmetic_reward, "format": format_reward,
                                        "digits": digits_reward}


def load_reward(name: str) -> RewardFn:
    """The reward function `name`: a built-in name or a 'module:function' path; a ConfigError naming it otherwise."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        raise ConfigError(f"reward {name!r}: not a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor a "
                          "module:function path")
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a missing module, or one that fails while importing: the user's file, one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"reward {name!r}: cannot import module {module_name!r} ({reason})") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: module {module_name!r} has no function {attribute!r}")
    return fn


def load_rewards(names: Sequence[str], weights: Sequence[float]) -> list[tuple[str, RewardFn, float]]:
    """(name, function, weight) for every reward; weights default to 1.0 each."""
    if not names:
        raise ConfigError("rewards: give at least one reward (a built-in name or module:function)")
    if weights and len(weights) != len(names):
        raise ConfigError(f"reward_weights: {len(weights)} weights for {len(names)} rewards; give one per reward "
                          "or none")
    return [(name, load_reward(name), float(w)) for name, w in zip(names, weights or [1.0] * len(names))]


def score(rewards: Sequence[tuple[str, RewardFn, float]], prompts: list[str], completions: list[str],
          answers: list[str]) -> tuple[list[float], dict[str, list[float]]]:
    """(the weighted sum of the rewards for each completion, each reward's own scores by name)."""
    totals = [0.0] * len(completions)
    each: dict[str, list[float]] = {}
    for name, fn, weight in rewards:
        values = fn(list(prompts), list(completions), list(answers))
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise DataError(f"reward {name!r} returned {type(values).__name__} of length "
                            f"{len(values) if hasattr(values, '__len__') else '?'}; expected a list of "
                            f"{len(completions)} numbers, one per completion")
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise DataError(f"reward {name!r} returned a value that is not a number: {list(values)[:4]!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"reward {name!r} returned a value that is not finite: {values[:4]!r}")
        each[name] = values
        totals = [t + weight * v for t, v in zip(totals, values)]
    return totals, each
