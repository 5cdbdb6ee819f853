"""The evaluation harness: metrics against sacrebleu and worked numbers, log-likelihoods and perplexity against a
direct forward pass, prompting, generation, and run_eval end to end on a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError, DataError, LmforgeError, TokenizerMismatchError
from lmforge.eval import EvalConfig, run_eval
from lmforge.eval.harness import EvalTask, evaluate_choice, generate_answers
from lmforge.eval.loglik import continuation_logprobs, stream_nll, stream_windows
from lmforge.eval.metrics import bleu, choice_scores, chrf, exact_match, normalize_answer
from lmforge.eval.perplexity import perplexity
from lmforge.eval.prompts import PromptFormat, choose_shots, is_chat_model
from lmforge.tasks.spec import TaskExample, TaskSpec
from lmforge.tasks.taskfile import load_task_file
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(model_dir):
    from lmforge.convert import load

    return load(model_dir), Tokenizer.load(model_dir)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _direct_logprob(model, ids: list[int], n_cont: int) -> float:
    """Sum of log p of the last n_cont tokens of `ids`, from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].float()  # (T - 1, V)
    logprobs = F.log_softmax(logits, dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ids) - n_cont, len(ids)))


# ---- metrics -------------------------------------------------------------------------------------------------


def test_normalize_and_exact_match():
    assert normalize_answer("  The   Dog. ") == "the dog"
    assert normalize_answer("42!?") == "42" and normalize_answer("e.g. dog") == "e.g. dog"
    assert exact_match(" Canine.", ["dog", "canine"]) == 1.0
    assert exact_match("a canine", ["canine"]) == 0.0 and exact_match("", ["x"]) == 0.0


def test_chrf_and_bleu_are_sacrebleus():
    predictions = ["die Förderung von Kohle", "ein Körnchen", "das Haus ist groß"]
    answers = [["die Förderung von Kohle"], ["ein Körnchen Wahrheit", "ein Quäntchen Wahrheit"], ["das Haus ist klein"]]
    refs = [["die Förderung von Kohle", "ein Körnchen Wahrheit", "das Haus ist klein"],
            [None, "ein Quäntchen Wahrheit", None]]
    assert chrf(predictions, answers) == sacrebleu.corpus_chrf(predictions, refs).score
    assert bleu(predictions, answers) == sacrebleu.corpus_bleu(predictions, refs).score
    single = [a[:1] for a in answers]
    assert chrf(predictions, single) == sacrebleu.corpus_chrf(predictions, [[a[0] for a in answers]]).score
    assert 0 < chrf(predictions, single) < 100 and chrf(predictions[:1], answers[:1]) == 100.0


def test_acc_and_acc_norm_worked_numbers():
    lls, choices = [-4.0, -6.0, -5.5], ["ab", "abcdef", "abcde"]  # per character: -2.0, -1.0, -1.1
    assert choice_scores(lls, choices, 0) == (1.0, 0.0)
    assert choice_scores(lls, choices, 1) == (0.0, 1.0)
    # lm-evaluation-harness: acc = argmax(lls) == gold, acc_norm = argmax(lls / completion_len) == gold
    completion_len = np.array([float(len(c)) for c in choices])
    assert int(np.argmax(np.array(lls) / completion_len)) == 1 and int(np.argmax(lls)) == 0
    assert choice_scores([-1.0, -1.0], ["a", "b"], 0) == (1.0, 1.0)  # ties go to the first, as numpy.argmax


# ---- log-likelihoods -----------------------------------------------------------------------------------------


def test_continuation_logprobs_match_a_direct_forward(tiny):
    model, tok = tiny
    requests = [(tok.encode("the cat sat"), tok.encode(" on the mat")), (tok.encode("a"), tok.encode(" dog")),
                (tok.encode("a dog is a friend of"), tok.encode(" the cat"))]
    scored = continuation_logprobs(model, requests, batch_size=2)
    for (ctx, cont), result in zip(requests, scored):
        assert result.tokens == len(cont)
        assert result.logprob == pytest.approx(_direct_logprob(model, ctx + cont, len(cont)), abs=1e-4)
    long_ctx = tok.encode("the cat sat on the mat " * 10)  # longer than block_size 32: cut from the left
    (cut,) = continuation_logprobs(model, [(long_ctx, tok.encode(" a dog"))])
    kept = (long_ctx + tok.encode(" a dog"))[-33:]
    assert cut.logprob == pytest.approx(_direct_logprob(model, kept, len(tok.encode(" a dog"))), abs=1e-4)


def test_choice_task_scores_match_a_direct_computation(tiny, tmp_path):
    model, tok = tiny
    items = load_task_file(_write_jsonl(tmp_path / "mc.jsonl", [
        {"prompt": "the cat sat on the", "choices": ["mat", "dog", "friend"], "label": 0},
        {"prompt": "a dog is a", "choices": ["friend", "cat"], "label": 1},
        {"question": "héllo", "choices": ["wörld", "the mat"], "label": 0}]))
    task = EvalTask(TaskSpec("mc", "choice", "accuracy", ""), items, items, "file")
    fmt = PromptFormat(tok, chat=False)
    result = evaluate_choice(model, task, fmt, EvalConfig(model="m", batch_size=3))
    acc, acc_norm = [], []
    for item in items:
        ctx = tok.encode(f"Question: {item.prompt}\nAnswer:")
        lls = [_direct_logprob(model, ctx + tok.encode(" " + c), len(tok.encode(" " + c))) for c in item.choices]
        lens = np.array([float(len(c)) for c in item.choices])
        acc.append(float(np.argmax(lls) == item.label))
        acc_norm.append(float(np.argmax(np.array(lls) / lens) == item.label))
    assert (result["acc"], result["acc_norm"]) == (pytest.approx(np.mean(acc)), pytest.approx(np.mean(acc_norm)))


def test_stream_windows_score_every_token_once():
    for n, block, stride in ((100, 16, 8), (100, 16, 16), (17, 16, 5), (2, 16, 8), (50, 7, 3)):
        windows = stream_windows(n, block, stride)
        scored = [t for begin, end, first in windows for t in range(first, end)]
        assert scored == list(range(1, n))
        for begin, end, first in windows:
            assert end - begin <= block + 1 and first > begin
            assert first == 1 or first - begin >= block - stride + 1  # context of at least block - stride
    assert stream_windows(1, 16, 8) == []
    with pytest.raises(ValueError):
        stream_windows(10, 8, 9)


def test_perplexity_of_a_text_file_matches_a_direct_forward(tiny, tmp_path):
    model, tok = tiny
    text = tmp_path / "t.txt"
    text.write_text("the cat sat\n\na dog is a friend\n", encoding="utf-8")
    docs = ["the cat sat\n", "a dog is a friend\n"]
    stream = [tok.eos_id] + [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert len(stream) <= 33  # one window
    nll = -_direct_logprob(model, stream, len(stream) - 1)
    result = perplexity(model, tok, text, paragraphs=True)
    assert result["scored_tokens"] == len(stream) - 1
    assert result["nats_per_token"] == pytest.approx(nll / (len(stream) - 1), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / (len(stream) - 1)), rel=1e-5)
    n_bytes = sum(len(d.encode()) for d in docs)
    assert result["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


def test_stream_nll_with_overlapping_windows(tiny):
    model, tok = tiny
    tokens = tok.encode("the cat sat on the mat and a dog is a friend " * 6)
    nll, scored = stream_nll(model, tokens, stride=32)
    assert scored == len(tokens) - 1
    direct = 0.0
    for begin in range(0, len(tokens) - 1, 32):  # non-overlapping windows of 33 tokens predict 32 each
        piece = tokens[begin:begin + 33]
        direct -= _direct_logprob(model, piece, len(piece) - 1)
    assert nll == pytest.approx(direct, rel=1e-5)
    assert stream_nll(model, tokens, stride=8)[1] == scored


def test_perplexity_of_a_dataset_dir(tiny, tmp_path):
    from lmforge.data.shards import DATASET_FORMAT, ShardWriter

    model, tok = tiny
    ids = tok.encode("a dog is a friend ", add_eos=True) * 8
    writer = ShardWriter(tmp_path, "val", tok.vocab_size, shard_tokens=40)
    writer.write(ids)
    meta = {"format": DATASET_FORMAT, "dtype": "uint16", "vocab_size": tok.vocab_size,
            "splits": {"val": {"shards": writer.close(), "tokens": len(ids), "bytes": 18 * 8}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    result = perplexity(model, tok, tmp_path, stride=16)
    nll, scored = stream_nll(model, ids, 16)
    assert result["scored_tokens"] == scored == len(ids) - 1
    assert result["bits_per_byte"] == pytest.approx(nll / scored * len(ids) / (18 * 8) / math.log(2), rel=1e-6)
    with pytest.raises(DataError, match="not found"):
        perplexity(model, tok, tmp_path / "missing.txt")
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "tokenizer_fingerprint": "0" * 64}))
    with pytest.raises(TokenizerMismatchError, match="tokenized with another tokenizer"):
        perplexity(model, tok, tmp_path)


# ---- prompting and generation --------------------------------------------------------------------------------


def test_plain_and_chat_prompts(tiny, model_dir, tmp_path):
    _, tok = tiny
    plain = PromptFormat(tok, chat=False)
    assert tok.decode(plain.context_ids("q?", [("a?", "b"), ("c?", "d")])) == \
        "Question: a?\nAnswer: b\n\nQuestion: c?\nAnswer: d\n\nQuestion: q?\nAnswer:"
    assert plain.continuation_ids("mat") == tok.encode(" mat") and plain.stop_rule() == ([tok.eos_id], ["\n"])
    chat = PromptFormat(tok, chat=True)
    assert chat.context_ids("q?", [("a?", "b")]) == tok.encode_chat(
        [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "q?"}],
        add_generation_prompt=True)
    assert chat.continuation_ids("mat") == tok.encode("mat")
    assert chat.stop_rule() == ([tok.special_ids["end"], tok.eos_id], [])
    pool = [TaskExample(str(i), f"q{i}", [f"a{i}"]) for i in range(10)]
    shots = choose_shots(pool, pool[3], 4, seed=0)
    assert len(shots) == 4 and pool[3] not in shots and shots == choose_shots(pool, pool[3], 4, seed=0)


def test_chat_auto_detection(model_dir, tmp_path):
    assert not is_chat_model(model_dir)  # an lmforge tokenizer always carries the template: not a sign of chat
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "lmforge_tokenizer.json").write_text("{}")
    (sft / "training.json").write_text(json.dumps({"stage": "sft", "chat": True}))
    assert is_chat_model(sft)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert not is_chat_model(hf)
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert is_chat_model(hf)
    (hf / "training.json").write_text(json.dumps({"chat": False}))
    assert not is_chat_model(hf)


def test_batched_greedy_answers_equal_one_by_one(tiny):
    from lmforge.infer.generate import GenerationConfig, generate

    model, tok = tiny
    fmt = PromptFormat(tok, chat=False)
    contexts = [fmt.context_ids(p) for p in ("the cat", "a dog is a friend", "héllo")]
    cfg = EvalConfig(model="m", batch_size=2, max_new_tokens=6)
    answers, truncated = generate_answers(model, tok, contexts, fmt, cfg)
    assert truncated == 0
    for context, answer in zip(contexts, answers):
        (alone,) = generate(model, [context], GenerationConfig(max_new_tokens=6, temperature=0.0, stop=["\n"]), tok)
        assert answer == alone.text.strip() and "\n" not in answer
    long_context = tok.encode("the cat sat on the mat " * 10)
    assert generate_answers(model, tok, [long_context], fmt, cfg)[1] == 1  # cut to leave room for the answer


# ---- run_eval ------------------------------------------------------------------------------------------------


def test_run_eval_end_to_end(model_dir, tmp_path, capsys):
    gen = _write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "a dog is", "answer": "a friend"},
                                                 {"prompt": "the cat", "answers": ["sat", "sits"]},
                                                 {"prompt": "héllo", "answer": "wörld"}])
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "the cat sat on the", "choices": ["mat", "dog"], "label": 0},
                                               {"question": "a dog is a", "choices": ["friend", "mat"], "label": 0}])
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. a dog is a friend.\n", encoding="utf-8")
    out = tmp_path / "report.json"
    report = run_eval(EvalConfig(model=str(model_dir), tasks=[str(gen), str(mc)], shots=1, max_new_tokens=5,
                                 text=str(text), out=str(out), batch_size=2))
    printed = capsys.readouterr().out
    assert "gen                  3  exact_match" in printed and "mc                   2  accuracy" in printed
    assert "bits/byte" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["format"] == "plain" and set(report["tasks"]) == {"gen", "mc"}
    assert report["tasks"]["mc"]["n"] == 2 and 0 <= report["tasks"]["mc"]["acc_norm"] <= 1
    assert len(report["tasks"]["gen"]["examples"]) == 3 and "chrf" in report["tasks"]["gen"]
    assert report["perplexity"]["scored_tokens"] > 0
    chat = run_eval(EvalConfig(model=str(model_dir), tasks=[f"{mc},{mc}"], chat=True, limit=1))  # as the CLI gives
    assert chat["format"] == "chat" and chat["tasks"]["mc"]["n"] == 1
    only_text = run_eval(EvalConfig(model=str(model_dir), text=str(text)))
    assert only_text["tasks"] == {} and only_text["perplexity"]["nats_per_token"] > 0


def test_run_eval_bad_input(model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task 'spelling' \(built-in tasks: define, name_word, synonym, "
                                          r"antonym, hypernym, translate, arithmetic, nli, mc_define, define_pref, "
                                          r"translate_pref, arithmetic_pref, all; or a \.jsonl task file\)"):
        run_eval(EvalConfig(model=str(model_dir), tasks=["spelling"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": "a"}\n{"prompt": "q"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        run_eval(EvalConfig(model=str(model_dir), tasks=[str(bad)]))
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(LmforgeError, match=r"model dir .*nowhere: not found"):
        run_eval(EvalConfig(model=str(tmp_path / "nowhere"), tasks=[str(good)]))
    with pytest.raises(DataError, match=r"missing\.jsonl: not found"):
        run_eval(EvalConfig(model=str(model_dir), tasks=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(ConfigError, match="eval needs a model dir"):
        run_eval(EvalConfig(tasks=[str(good)]))
    with pytest.raises(ConfigError, match=r"eval shots=-1: expected >= 0"):
        EvalConfig(model=str(model_dir), shots=-1)
