"""AI judges of responses (RLAIF): which of two responses to a prompt is better, and the ranking of several.

Two kinds, told apart by the judge dir (`load_judge`):
- a reward model (lmforge reward: task_head.json of kind reward) scores each response alone, and the preference of
  A over B is r(x, A) - r(x, B);
- any other model dir (lmforge or Hugging Face) is asked under a written rubric (Bai et al. 2022, Lee et al.
  2023). The judge prompt (JUDGE_PROMPT) holds the rubric, the question and the two responses labelled A and B,
  and the verdict is the log-odds of the continuation "A" against "B":

      v(A, B) = log p("A" | judge prompt(A, B)) - log p("B" | judge prompt(A, B))

  A chat model reads the judge prompt as a user turn and answers as the assistant; a base model reads lmforge's
  plain `Question: ...\\nAnswer:` format (lmforge.eval.prompts decides which, as `lmforge eval` does). A judge that
  favours a position adds the same bias c to every verdict; with both_orders each pair is also shown swapped and

      pref(A over B) = (v(A, B) - v(B, A)) / 2

  in which c cancels: pref(x, x) = 0 and pref(A, B) = -pref(B, A) exactly, whatever the judge's bias.

A preference is positive when A is the better response. Rankings of K > 2 responses (`rank_responses`) judge every
pair once; a response earns a win for each pair it is preferred in (half a win for a tie) and the responses are
ranked by wins, then by their summed preferences, then by their position (a stable order). For a reward model this
is the ranking by score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from lmforge.errors import LmforgeError
from lmforge.stages.config import DEFAULT_RUBRIC

Prompt = str | list[dict[str, str]]  # one user turn, or chat messages ending with a user turn

JUDGE_PROMPT = ("{rubric}\n\nQuestion: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
                "Which answer is better? Reply with A or B.")
LABELS = ("A", "B")


@dataclass
class Judge:
    """A loaded judge (see the module docstring). fmt: the PromptFormat of a rubric judge. cut_prompts counts the
    judge prompts that were longer than the model's context and lost their beginning (the rubric)."""

    kind: Literal["reward", "rubric"]
    model: Any
    tokenizer: Any
    fmt: Any = None
    rubric: str = DEFAULT_RUBRIC
    both_orders: bool = True
    batch_size: int = 16
    cut_prompts: int = 0

    @property
    def description(self) -> str:
        if self.kind == "reward":
            return "reward model"
        return f"rubric ({self.fmt.name} format{', both orders' if self.both_orders else ''})"


def judge_kind(path: str | Path) -> Literal["reward", "rubric"]:
    """The kind of judge a model dir is, checked without loading the weights: the dir exists and its tokenizer
    loads. A one-line LmforgeError otherwise."""
    from lmforge.model.heads import read_head_config
    from lmforge.tokenizer import LMFORGE_FILE, TOKENIZER_FILE, Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise LmforgeError(f"judge {path}: not found (expected a model dir or a reward model dir)")
    if not (path / "config.json").is_file():
        raise LmforgeError(f"judge {path}: no config.json (expected an lmforge or Hugging Face model dir)")
    try:
        if (path / LMFORGE_FILE).is_file():
            Tokenizer.load(path)
        elif (path / TOKENIZER_FILE).is_file():
            Tokenizer.from_hf(path)
        else:
            raise LmforgeError("no tokenizer files (tokenizer.json)")
    except LmforgeError as exc:
        raise LmforgeError(f"judge {path}: its tokenizer does not load: {exc}") from None
    head = read_head_config(path)
    return "reward" if head is not None and head.get("kind") == "reward" else "rubric"


def load_judge(path: str | Path, device: str = "cpu", rubric: str = DEFAULT_RUBRIC, both_orders: bool = True,
               batch_size: int = 16) -> Judge:
    """The judge of a model dir, on `device`: a reward model dir scores, any other model dir reads the rubric."""
    kind = judge_kind(path)
    if kind == "reward":
        from lmforge.stages.reward import load_reward_model

        model, tokenizer = load_reward_model(str(path), device)
        return Judge("reward", model, tokenizer, batch_size=batch_size)
    from lmforge.convert import load_with_tokenizer
    from lmforge.eval.prompts import PromptFormat, is_chat_model  # a higher layer, on demand

    if not rubric.strip():
        raise LmforgeError(f"judge {path}: the rubric is empty; a model judge needs a written rubric")
    model, tokenizer = load_with_tokenizer(path, device)
    return Judge("rubric", model, tokenizer, PromptFormat(tokenizer, is_chat_model(path)), rubric, both_orders,
                 batch_size)


def question_text(prompt: Prompt) -> str:
    """The question a rubric judge reads: the user turn, or every turn as `role: content` lines when there are
    several (a system prompt, an earlier exchange)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{turn['role']}: {turn['content']}" for turn in prompt)


def judge_prompt(rubric: str, question: str, a: str, b: str) -> str:
    """The text a rubric judge reads for the pair (A = a, B = b)."""
    return JUDGE_PROMPT.format(rubric=rubric.strip(), question=question, a=a, b=b)


def order_verdicts(judge: Judge, prompts: Sequence[Prompt], first: Sequence[str], second: Sequence[str]
                   ) -> list[float]:
    """v(A, B) of a rubric judge for each pair shown in this one order (A = first[i], B = second[i]): the
    log-odds of answering "A" rather than "B", position bias included."""
    from lmforge.eval.loglik import continuation_logprobs

    letters = [judge.fmt.continuation_ids(label) for label in LABELS]
    fits = judge.model.config.block_size + 1
    requests = []
    for prompt, a, b in zip(prompts, first, second, strict=True):
        context = judge.fmt.context_ids(judge_prompt(judge.rubric, question_text(prompt), a, b))
        judge.cut_prompts += len(context) + max(map(len, letters)) > fits
        requests += [(context, letters[0]), (context, letters[1])]
    scored = continuation_logprobs(judge.model, requests, judge.batch_size)
    return [scored[i].logprob - scored[i + 1].logprob for i in range(0, len(scored), 2)]


def judge_pairs(judge: Judge, prompts: Sequence[Prompt], a_responses: Sequence[str],
                b_responses: Sequence[str]) -> list[float]:
    """The preference of a_responses[i] over b_responses[i] as answers to prompts[i]: positive when A is better.
    A reward model: r(A) - r(B). A rubric judge: v(A, B), or (v(A, B) - v(B, A)) / 2 with both_orders."""
    if judge.kind == "reward":
        from lmforge.stages.reward import reward_scores

        n = len(prompts)
        scores = reward_scores(judge.model, judge.tokenizer, [*prompts, *prompts], [*a_responses, *b_responses],
                               judge.batch_size)
        return [scores[i] - scores[n + i] for i in range(n)]
    forward = order_verdicts(judge, prompts, a_responses, b_responses)
    if not judge.both_orders:
        return forward
    backward = order_verdicts(judge, prompts, b_responses, a_responses)
    return [(f - b) / 2 for f, b in zip(forward, backward)]


def preference_matrices(judge: Judge, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]]
                        ) -> list[list[list[float]]]:
    """For each prompt, the K x K matrix of pref(response i over response j) (antisymmetric, 0 on the diagonal).
    A reward model scores each response once; a rubric judge judges every pair i < j once (per order)."""
    if judge.kind == "reward":
        from lmforge.stages.reward import reward_scores

        flat = [(prompt, response) for prompt, group in zip(prompts, groups) for response in group]
        scores = iter(reward_scores(judge.model, judge.tokenizer, [p for p, _ in flat], [r for _, r in flat],
                                    judge.batch_size))
        values = [[next(scores) for _ in group] for group in groups]
        return [[[si - sj for sj in s] for si in s] for s in values]
    pairs = [(n, i, j) for n, group in enumerate(groups) for i in range(len(group)) for j in range(i + 1, len(group))]
    prefs = judge_pairs(judge, [prompts[n] for n, _, _ in pairs], [groups[n][i] for n, i, _ in pairs],
                        [groups[n][j] for n, _, j in pairs])
    matrices = [[[0.0] * len(group) for _ in group] for group in groups]
    for (n, i, j), pref in zip(pairs, prefs):
        matrices[n][i][j], matrices[n][j][i] = pref, -pref
    return matrices


def rank_by_wins(matrix: Sequence[Sequence[float]]) -> list[int]:
    """Response indices best first: by pairwise wins (a tie is half a win), then summed preference, then index."""
    k = len(matrix)
    wins = [sum((matrix[i][j] > 0) + 0.5 * (matrix[i][j] == 0) for j in range(k) if j != i) for i in range(k)]
    return sorted(range(k), key=lambda i: (-wins[i], -sum(matrix[i]), i))


def ranking_margin(matrix: Sequence[Sequence[float]], order: Sequence[int]) -> float:
    """How strongly the judge holds a ranking: the mean preference of each response over every one ranked below
    it (for a pair, the preference of the chosen over the rejected)."""
    below = [matrix[order[a]][order[b]] for a in range(len(order)) for b in range(a + 1, len(order))]
    return sum(below) / len(below)


def rank_responses(judge: Judge, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]]
                   ) -> list[tuple[list[int], float]]:
    """For each prompt's responses (at least 2): (indices best first, ranking_margin)."""
    rankings = []
    for matrix in preference_matrices(judge, prompts, groups):
        order = rank_by_wins(matrix)
        rankings.append((order, ranking_margin(matrix, order)))
    return rankings
