"""How a question reaches the model: the plain format for base models, the chat format for chat models.

plain:  k-shot blocks `Question: {prompt}\\nAnswer: {answer}\\n\\n`, then `Question: {prompt}\\nAnswer:`; the
        answer is the continuation ' ' + answer; generation stops at eos or a newline.
chat:   k-shot examples as earlier user/assistant turns, the prompt as the last user turn, then the generation
        prompt (`tokenizer.encode_chat(..., add_generation_prompt=True)`: lmforge-chat-v1, or a Hugging Face
        dir's own chat template); the answer is the assistant content itself; generation stops at `<|end|>` or eos.

chat=auto (`is_chat_model`): a model dir's training.json decides when it has a "chat" field (the SFT stage
writes it); else a dir with an lmforge tokenizer is a base model (every lmforge tokenizer carries the chat
template, so the template says nothing), and a Hugging Face dir is a chat model when it has a chat template
(tokenizer_config.json's chat_template, or chat_template.jinja).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from lmforge.tasks.spec import TaskExample


def _json_field(path: Path, key: str) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def is_chat_model(model_dir: str | Path) -> bool:
    """Whether chat=auto picks the chat format for `model_dir` (see the module docstring)."""
    model_dir = Path(model_dir)
    chat = _json_field(model_dir / "training.json", "chat")
    if isinstance(chat, bool):
        return chat
    if (model_dir / "lmforge_tokenizer.json").is_file():
        return False
    return (model_dir / "chat_template.jinja").is_file() or \
        bool(_json_field(model_dir / "tokenizer_config.json", "chat_template"))


def choose_shots(pool: Sequence[TaskExample], example: TaskExample, k: int, seed: int) -> list[TaskExample]:
    """k examples of `pool` other than `example`, drawn by random.Random(f'{seed}:{example.id}'): the same shots
    for the same example on every run, different shots for different examples."""
    if k == 0:
        return []
    candidates = [shot for shot in pool if shot.id != example.id]
    return random.Random(f"{seed}:{example.id}").sample(candidates, min(k, len(candidates)))


class PromptFormat:
    """Builds context token ids, continuation token ids and the generation stop rule for one tokenizer."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat = tokenizer, chat

    @property
    def name(self) -> str:
        return "chat" if self.chat else "plain"

    def context_ids(self, prompt: str, shots: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the context that precedes the answer."""
        if not self.chat:
            text = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots) + f"Question: {prompt}\nAnswer:"
            return self.tokenizer.encode(text)
        messages = []
        for question, answer in shots:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def continuation_ids(self, answer: str) -> list[int]:
        """Token ids of an answer after the context: ' ' + answer in plain format, the answer itself in chat."""
        return self.tokenizer.encode(answer if self.chat else " " + answer)

    def stop_rule(self) -> tuple[list[int], list[str]]:
        """(stop ids, stop strings) for generation: plain stops at eos or '\\n'; chat at the end of the assistant's
        turn (`Tokenizer.chat_stop_ids`: <|end|> and eos)."""
        if not self.chat:
            return [self.tokenizer.eos_id], ["\n"]
        return self.tokenizer.chat_stop_ids, []
