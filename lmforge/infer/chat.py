"""`lmforge chat MODEL_DIR`: a multi-turn conversation in the terminal, streamed as it is generated.

Each turn renders the whole conversation with the tokenizer's chat template and generates the assistant's reply
until the turn's end token (`Tokenizer.chat_stop_ids`: <|end|> for lmforge-chat-v1, and eos). When the
conversation no longer fits the model's context, the oldest user/assistant exchanges are left out (the system
prompt stays). Commands: /reset starts over, /exit (or Ctrl-D) quits. `--prompt TEXT` runs one turn and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, TextIO

from lmforge.errors import ConfigError, LmforgeError, TokenizerMismatchError
from lmforge.infer.config import ChatConfig, GenerationConfig

MIN_REPLY_TOKENS = 16  # room a turn keeps for the reply when old exchanges are left out


def fit_conversation(tokenizer: Any, messages: list[dict[str, str]], block_size: int) -> list[int]:
    """Prompt ids of `messages` with the generation prompt, leaving out the oldest exchanges (never the system
    prompt or the last user turn) until MIN_REPLY_TOKENS fit after them; LmforgeError if even that is too long."""
    kept = list(messages)
    while True:
        ids = tokenizer.encode_chat(kept, add_generation_prompt=True)
        if len(ids) + MIN_REPLY_TOKENS <= block_size:
            return ids
        first = 1 if kept and kept[0]["role"] == "system" else 0
        if len(kept) - first <= 1:
            raise LmforgeError(f"the message is {len(ids)} tokens with the chat template; the model's context is "
                               f"{block_size} tokens: write a shorter message")
        del kept[first:first + 2]  # the oldest user turn and the reply to it


class ChatSession:
    """A conversation with a model: `reply(text)` streams the assistant's answer to `out` and returns it."""

    def __init__(self, model: Any, tokenizer: Any, cfg: GenerationConfig, system: Optional[str] = None) -> None:
        if tokenizer.chat_template is None:
            raise TokenizerMismatchError("this model's tokenizer has no chat template: use lmforge generate, or a "
                                         "model trained with lmforge sft")
        from lmforge.infer.engine import engine_for

        self.model, self.tokenizer, self.cfg, self.system = model, tokenizer, cfg, system
        # the engine's prefix cache keeps the conversation's blocks: a turn computes only what is new
        self.engine = engine_for(model, tokenizer, cfg, max_seqs=1)
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, out: TextIO) -> str:
        from lmforge.infer.generate import stream_completion

        self.messages.append({"role": "user", "content": text})
        try:
            ids = fit_conversation(self.tokenizer, self.messages, self.model.config.block_size)
        except LmforgeError:
            self.messages.pop()
            raise
        if self.engine is not None:
            turn = self.engine.stream(ids, self.cfg, eos_id=self.tokenizer.chat_stop_ids)
        else:
            turn = stream_completion(self.model, self.tokenizer, ids, self.cfg, eos_id=self.tokenizer.chat_stop_ids)
        while True:
            try:
                out.write(next(turn))
                out.flush()
            except StopIteration as finished:
                answer = finished.value.text or ""
                break
        out.write("\n")
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def run_chat(cfg: ChatConfig, stdin: Optional[TextIO] = None, out: Optional[TextIO] = None) -> list[dict[str, str]]:
    """The `lmforge chat` command (see the module docstring); returns the conversation. Reads standard input and
    writes standard output unless `stdin` and `out` are given."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if not cfg.model:
        raise ConfigError("chat needs a model dir: lmforge chat MODEL_DIR")
    from lmforge.convert import load_with_tokenizer

    from lmforge.infer.quant import quantize_as_configured

    model, tokenizer = load_with_tokenizer(cfg.model, cfg.device)
    quantize_as_configured(model, cfg)
    session = ChatSession(model, tokenizer, cfg, cfg.system)
    if cfg.prompt is not None:
        session.reply(cfg.prompt, out)
        return session.messages
    out.write(f"chatting with {Path(cfg.model)} ({model.num_parameters():,} parameters); /reset starts over, "
              "/exit or Ctrl-D quits\n")
    while True:
        out.write("> ")
        out.flush()
        line = stdin.readline()
        if not line:  # Ctrl-D
            out.write("\n")
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            out.write("(the conversation starts over)\n")
            continue
        if not text.strip():
            continue
        try:
            session.reply(text, out)
        except LmforgeError as exc:  # a message too long for the context: say so and go on
            out.write(f"(error: {exc})\n")
    return session.messages
