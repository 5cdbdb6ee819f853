"""Generated arithmetic with checkable answers: a + b and a - b with 2-4 digit operands (a >= b, so answers are
never negative) and a * b with a 2-3 digit and a 1-2 digit operand.

Problems are drawn by `random.Random(seed)` (a str or int seed is stable across Python versions and machines),
deduplicated, and each problem text (`347 + 58`) is the key that decides its split.
"""

from __future__ import annotations

import random
from typing import Any

DEFAULT_PROBLEMS = 30_000
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def draw_problem(rng: random.Random) -> tuple[int, str, int]:
    """One (a, op, b) as the module docstring describes."""
    op = rng.choice("+-*")
    if op == "*":
        return _operand(rng, 2, 3), op, _operand(rng, 1, 2)
    a, b = _operand(rng, 2, 4), _operand(rng, 2, 4)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def arithmetic_rows(n_problems: int = DEFAULT_PROBLEMS, seed: int = 0) -> list[dict[str, Any]]:
    """Up to `n_problems` distinct problems as task rows; the answer is the exact integer result."""
    rng = random.Random(f"lmforge-arithmetic:{seed}")
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(n_problems):
        a, op, b = draw_problem(rng)
        problem = f"{a} {op} {b}"
        rows.setdefault(problem, {"id": f"arithmetic:{problem}", "vars": {"a": str(a), "op": op, "b": str(b)},
                                  "answers": [str(OPERATIONS[op](a, b))], "choices": [], "label": -1,
                                  "source": f"arithmetic:{problem}"})
    return list(rows.values())


def wrong_answer(problem: str, answer: int) -> int:
    """A plausible wrong result, stable per problem: off by one, by ten or by a hundred, or two digits swapped;
    never negative, never the answer."""
    rng = random.Random(f"lmforge-arithmetic-wrong:{problem}")
    candidates = [answer + d for d in (1, -1, 10, -10, 100, -100)]
    digits = str(answer)
    if len(digits) >= 2:
        i = rng.randrange(len(digits) - 1)
        swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
        if not swapped.startswith("0"):
            candidates.append(int(swapped))
    candidates = [c for c in candidates if c >= 0 and c != answer]
    return rng.choice(candidates)


def arithmetic_pref_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs of the arithmetic task: the exact result (chosen) against a wrong one (rejected)."""
    out = []
    for row in rows:
        problem = row["id"].split(":", 1)[1]
        answer = int(row["answers"][0])
        out.append({**row, "id": f"arithmetic_pref:{problem}",
                    "choices": [str(answer), str(wrong_answer(problem, answer))], "label": 0})
    return out
