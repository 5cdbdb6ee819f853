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
