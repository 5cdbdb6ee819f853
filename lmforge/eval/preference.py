"""Preference sets in `lmforge eval`: how often a model ranks the chosen response above the rejected one.

Three scorers, by what is evaluated:
- a reward model dir (task_head.json of kind reward): its scalar reward r(x, y);
- a policy with `--reference DIR` (a DPO model against its reference): the implicit reward
  log pi(y|x) - log pi_ref(y|x), DPO's beta-free measure;
- a policy alone: log pi(y|x).
For every pair (chosen w, rejected l) the score difference s(w) - s(l) is the margin; accuracy is the share of
pairs with a positive margin, and the report gives the mean margin too. A log-probability is summed over the
response's tokens and, in the chat format, the first token that ends the assistant turn: for lmforge's chat
template exactly what DPO trains on (a Hugging Face template may end a turn with more tokens, which DPO also
trains on and this leaves out).
"""

from __future__ import annotations

from typing import Any, Optional

from lmforge.eval.metrics import mean


def response_ids(fmt: Any, answer: str) -> list[int]:
    """The scored tokens of a response: the continuation, and in chat format the end-of-turn token."""
    ids = fmt.continuation_ids(answer)
    return ids + fmt.tokenizer.chat_stop_ids[:1] if fmt.chat else ids


def _logprobs(model: Any, task: Any, contexts: list[list[int]], fmt: Any, batch_size: int) -> list[list[float]]:
    from lmforge.eval.loglik import continuation_logprobs

    requests = [(context, response_ids(fmt, r)) for example, context in zip(task.examples, contexts)
                for r in example.choices]
    scored = iter(continuation_logprobs(model, requests, batch_size))
    return [[next(scored).logprob for _ in example.choices] for example in task.examples]


def _summary(scores: list[list[float]], label: int = 0) -> dict[str, Any]:
    """accuracy and mean margin over every (better, worse) pair of each item's ranked scores."""
    hits, margins = [], []
    for values in scores:
        for i in range(len(values)):
            for j in range(i + 1, len(values)):
                margins.append(values[i] - values[j])
                hits.append(float(values[i] > values[j]))
    return {"acc": mean(hits), "value": mean(hits), "margin": mean(margins), "pairs": len(hits)}


def evaluate_preference(model: Any, task: Any, fmt: Any, contexts: list[list[int]], cfg: Any,
                        reference: Optional[Any] = None, reward_model: Optional[Any] = None) -> dict[str, Any]:
    """The preference accuracy and margin of one task (see the module docstring)."""
    if reward_model is not None:
        from lmforge.stages.reward import reward_scores

        flat = [(example.prompt, r) for example in task.examples for r in example.choices]
        values = iter(reward_scores(reward_model, fmt.tokenizer, [p for p, _ in flat], [r for _, r in flat],
                                    cfg.batch_size))
        scores = [[next(values) for _ in example.choices] for example in task.examples]
        return {**_summary(scores), "scored_by": "reward model"}
    policy = _logprobs(model, task, contexts, fmt, cfg.batch_size)
    if reference is None:
        return {**_summary(policy), "scored_by": "log-likelihood"}
    ref = _logprobs(reference, task, contexts, fmt, cfg.batch_size)
    implicit = [[p - r for p, r in zip(ps, rs)] for ps, rs in zip(policy, ref)]
    return {**_summary(implicit), "likelihood_acc": _summary(policy)["acc"],
            "scored_by": f"implicit reward against {cfg.reference}"}
