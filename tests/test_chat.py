"""`lmforge chat`: one-turn and interactive sessions, streamed replies equal to generate's, /reset, the context."""

import io
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.infer.chat import ChatSession, fit_conversation, run_chat
from lmforge.infer.config import ChatConfig, GenerationConfig
from lmforge.infer.generate import generate
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chatmodel")
    tok = Tokenizer.train(["the cat sat on the mat", "a dog is a friend", "2 + 3 = 5"] * 20, vocab_size=300)
    torch.manual_seed(1)
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=tok.vocab_size, block_size=96, d_model=32,
                                   init_std=0.2)).save(root)
    tok.save(root)
    return root


def greedy_reply(model_dir: Path, messages: list[dict], max_new_tokens: int = 12) -> str:
    model, tok = Transformer.from_dir(model_dir).eval(), Tokenizer.load(model_dir)
    ids = tok.encode_chat(messages)
    return generate(model, [ids], GenerationConfig(max_new_tokens=max_new_tokens, temperature=0), tok,
                    eos_id=tok.chat_stop_ids)[0].text


def test_one_turn_prints_the_streamed_reply(chat_model, capsys):
    assert main(["chat", str(chat_model), "--prompt", "a dog is", "--temperature", "0", "--max_new_tokens", "12",
                 "--system", "be brief"]) == 0
    expected = greedy_reply(chat_model, [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "a dog is"}])
    assert capsys.readouterr().out == expected + "\n"


def test_interactive_session_keeps_history_and_resets(chat_model):
    stdin = io.StringIO("a dog is\nthe cat\n/reset\nthe cat\n\n/exit\nnever read\n")
    out = io.StringIO()
    cfg = ChatConfig(model=str(chat_model), temperature=0, max_new_tokens=6)
    messages = run_chat(cfg, stdin=stdin, out=out)
    first = greedy_reply(chat_model, [{"role": "user", "content": "a dog is"}], 6)
    second = greedy_reply(chat_model, [{"role": "user", "content": "a dog is"}, {"role": "assistant", "content": first},
                                       {"role": "user", "content": "the cat"}], 6)
    fresh = greedy_reply(chat_model, [{"role": "user", "content": "the cat"}], 6)
    printed = out.getvalue()
    assert f"> {first}\n> {second}\n> (the conversation starts over)\n> {fresh}\n> > " in printed
    assert messages == [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": fresh}]


def test_old_exchanges_leave_the_context_first(chat_model):
    tok = Tokenizer.load(chat_model)
    long = " ".join(["the cat sat on the mat"] * 6)
    messages = [{"role": "system", "content": "be brief"}]
    for _ in range(4):
        messages += [{"role": "user", "content": long}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "a dog is"})
    ids = fit_conversation(tok, messages, block_size=96)
    assert len(ids) + 16 <= 96
    assert ids[:len(tok.encode_chat(messages[:1], add_generation_prompt=False))] == \
        tok.encode_chat(messages[:1], add_generation_prompt=False)  # the system prompt stays
    assert ids[-len(tok.encode_chat(messages[-1:])):] == tok.encode_chat(messages[-1:])


def test_a_message_too_long_is_reported_and_the_session_goes_on(chat_model):
    stdin = io.StringIO(" ".join(["the cat sat on the mat"] * 30) + "\na dog is\n")
    out = io.StringIO()
    messages = run_chat(ChatConfig(model=str(chat_model), temperature=0, max_new_tokens=4), stdin=stdin, out=out)
    assert "(error: the message is" in out.getvalue()
    assert [m["content"] for m in messages if m["role"] == "user"] == ["a dog is"]


def test_a_model_without_chat_template_is_refused(chat_model):
    tok = Tokenizer.load(chat_model)
    tok.chat_template = None
    with pytest.raises(Exception, match="no chat template"):
        ChatSession(Transformer.from_dir(chat_model), tok, GenerationConfig())
