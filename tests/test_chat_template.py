"""The chat template: lmforge-chat-v1 as Jinja, equal ids through transformers' apply_chat_template on an exported
model, a Hugging Face model's own template kept on import, and the assistant mask SFT trains on."""

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is a dog?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Opposite of hot?"},
     {"role": "assistant", "content": "cold"}, {"role": "user", "content": "And of up?"}],
    [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Translate: the cat"}, {"role": "assistant", "content": "die Katze"}],
    [{"role": "user", "content": "héllo wörld, 北京 🙂\n  indented"}, {"role": "assistant", "content": " x "}],
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def hf_ids(hf_tok, messages, add_generation_prompt):
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = Tokenizer.train(["the cat sat on the mat", "a dog is a friend", "die Katze und der Hund"] * 20,
                          vocab_size=320)
    model_dir, hf_dir = root / "model", root / "hf"
    torch.manual_seed(0)
    Transformer(ModelConfig.preset("tiny-llama", vocab_size=tok.vocab_size, block_size=64)).save(model_dir)
    tok.save(model_dir)
    assert main(["convert", str(model_dir), str(hf_dir), "--to", "hf"]) == 0
    return tok, model_dir, hf_dir


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_transformers_apply_chat_template_gives_lmforges_ids(exported, add_generation_prompt):
    tok, _, hf_dir = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    for messages in CONVERSATIONS:
        ours = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        assert hf_ids(hf_tok, messages, add_generation_prompt) == ours
        assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt) \
            == tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def test_assistant_mask_covers_every_assistant_turn_and_its_end(exported):
    tok = exported[0]
    ids, mask = tok.encode_chat_with_mask(CONVERSATIONS[2])
    assert ids == tok.encode_chat(CONVERSATIONS[2], add_generation_prompt=False)
    trained = [i for i, m in zip(ids, mask) if m]
    end = tok.special_ids["end"]
    assert trained == [*tok.encode("4"), end, *tok.encode("die Katze"), end]


def test_a_hugging_face_template_is_kept_and_used(exported, tmp_path):
    tok, _, hf_dir = exported
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    hf_json = json.loads((hf_dir / "tokenizer.json").read_text())
    next_id = max(t["id"] for t in hf_json["added_tokens"]) + 1
    for i, token in enumerate(("<|im_start|>", "<|im_end|>")):
        hf_json["added_tokens"].append({"id": next_id + i, "content": token, "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": True})
        hf_json["model"]["vocab"][token] = next_id + i
    (foreign / "tokenizer.json").write_text(json.dumps(hf_json))
    (foreign / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    imported = Tokenizer.from_hf(foreign)
    assert imported.chat_template == CHATML and not imported.uses_lmforge_chat
    hf_tok = transformers.AutoTokenizer.from_pretrained(foreign)
    for messages in CONVERSATIONS:
        assert imported.encode_chat(messages) == hf_ids(hf_tok, messages, True)
    ids, mask = imported.encode_chat_with_mask(CONVERSATIONS[2])
    assert imported.decode([i for i, m in zip(ids, mask) if m]) == "4<|im_end|>\ndie Katze<|im_end|>\n"
    assert imported.eos_id in imported.chat_stop_ids
    imported.save(tmp_path / "saved")  # an lmforge tokenizer dir keeps it too
    assert Tokenizer.load(tmp_path / "saved").chat_template == CHATML


def test_convert_from_hugging_face_keeps_the_template(exported, tmp_path):
    _, _, hf_dir = exported
    back = tmp_path / "back"
    (hf_dir / "lmforge_tokenizer.json").rename(tmp_path / "aside.json")  # a plain HF dir
    try:
        assert main(["convert", str(hf_dir), str(back)]) == 0
    finally:
        (tmp_path / "aside.json").rename(hf_dir / "lmforge_tokenizer.json")
    restored = Tokenizer.load(back)
    assert restored.uses_lmforge_chat
    assert restored.encode_chat(CONVERSATIONS[1]) == exported[0].encode_chat(CONVERSATIONS[1])
