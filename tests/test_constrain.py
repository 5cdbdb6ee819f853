"""Structured output: llguidance grammars (JSON schema, any JSON object, regex) through the engine, with a tiny random
model decoding greedily and by sampling; every output must parse and validate."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.config import GenerationConfig
from lmforge.infer.constrain import (Grammar, json_object_grammar, json_schema_grammar, ll_tokenizer,
                                     regex_grammar, response_format_grammar)
from lmforge.infer.engine import Engine
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

PROMPTS = ["a dog is", "the cat sat", "héllo"]
# Every schema below bounds its output: strings have maxLength or an enum, integers a minimum and maximum, arrays
# maxItems, objects "additionalProperties": false. llguidance emits compact JSON and a character is at most 6 bytes
# (a \u00XX escape of a control character; other characters are raw UTF-8), so the longest output of each is under
# 150 bytes, hence under 150 tokens whatever the model picks: MAX_NEW (prompts are under 10 tokens, the context
# 256) cannot cut one, and every output must end with its grammar complete.
MAX_NEW = 200
SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "student": {"type": "boolean"}},
        "required": ["name", "age", "student"], "additionalProperties": False},
    "enum_and_array": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "active": {"type": "boolean"}},
        "required": ["color", "tags", "active"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "owner": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99},
            "admin": {"type": "boolean"}},
            "required": ["id", "admin"], "additionalProperties": False},
        "level": {"type": "integer", "enum": [1, 2, 3]}},
        "required": ["owner", "level"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {
        "value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5},
                            {"type": "string", "maxLength": 4}, {"type": "null"}]},
        "note": {"type": "string", "minLength": 1, "maxLength": 6}},
        "required": ["value"], "additionalProperties": False},
    "array_of_digits": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "minItems": 1, "maxItems": 4},
    "pattern": {"type": "object", "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000}},
        "required": ["code", "count"], "additionalProperties": False},
}
GREEDY = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0)
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = ['{"name": "the cat", "age": 12, "ok": true, "tags": ["a", "b"]}', "a dog is a friend",
             "the cat sat on the mat", "héllo wörld"]
    return Tokenizer.train(texts * 20, vocab_size=340)


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> Transformer:
    """A tiny random model whose vocabulary is padded past the tokenizer's (those ids must never be picked)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny-llama", vocab_size=tok.vocab_size + 13, block_size=256, d_model=32)
    return Transformer(cfg).eval()


def sampled(seed: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=MAX_NEW, temperature=1.0, seed=seed)


def run_all(engine: Engine, requests: list[tuple[str, GenerationConfig, dict]]) -> list:
    """Add every (prompt, cfg, add_request kwargs) at once (one batch) and return each request's completions."""
    ids = [engine.add_request(prompt, cfg, **kwargs) for prompt, cfg, kwargs in requests]
    engine.run_until_done(ids)
    return [engine.completions(r) for r in ids]


# ---- outputs through the engine ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEMAS))
def test_greedy_and_sampled_outputs_parse_and_validate(tok, model, name):
    schema = SCHEMAS[name]
    grammar = json_schema_grammar(tok, model.config.vocab_size, schema)
    # half the requests end at eos, half at the chat turn's end: both are allowed only once the JSON is complete
    requests = [(prompt, cfg, {"constraint": grammar, "eos_id": tok.chat_stop_ids if i % 2 else None})
                for i, (prompt, cfg) in enumerate([(p, GREEDY) for p in PROMPTS] +
                                                  [(PROMPTS[s % 3], sampled(s)) for s in SEEDS])]
    engine = Engine(model, tok, max_seqs=8)
    outputs = [c[0] for c in run_all(engine, requests)]
    for out in outputs:
        assert out.finish_reason == "stop", out
        assert max(out.token_ids) < tok.vocab_size
        jsonschema.validate(json.loads(out.text), schema)
        assert tok.decode(out.token_ids) == out.text  # no eos token: the grammar ended the sample
    assert len({o.text for o in outputs}) > 1  # the samples differ: each has its own generator and state
    assert engine.pool.num_used == 0 and not engine.has_unfinished()


def close_json_bias(tok: Tokenizer, vocab_size: int) -> torch.Tensor:
    """Logit offsets that make JSON end: +7 for a token that closes a string (a quote, then only ':', '}' or
    ']'), +5 for one made of closing brackets only, 0 for the rest. The random model's logits span ~0.7, so greedy
    decoding closes each string at once and each object after its first value, and a sample closes a string with
    probability ~0.6 at each token and an object ~0.99 after each value: an unbounded JSON object then ends long
    before MAX_NEW (greedy by construction, sampled with these seeds)."""
    bias = torch.zeros(vocab_size)
    for token in range(tok.vocab_size):
        text = tok.decode([token])
        bias[token] = 7.0 if re.fullmatch(r'"[:\]}]*', text) else 5.0 if re.fullmatch(r"[\]}]+", text) else 0.0
    return bias


def test_json_object_outputs_are_objects(tok, model):
    bias = close_json_bias(tok, model.config.vocab_size)
    hook = model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)
    try:
        grammar = json_object_grammar(tok, model.config.vocab_size)
        requests = [(PROMPTS[0], GREEDY, {"constraint": grammar})] + \
                   [(PROMPTS[s % 3], sampled(s), {"constraint": grammar}) for s in range(6)]
        outputs = [c[0] for c in run_all(Engine(model, tok), requests)]
    finally:
        hook.remove()
    for out in outputs:
        assert out.finish_reason == "stop", out
        assert isinstance(json.loads(out.text), dict)
    assert any(json.loads(o.text) for o in outputs)  # not only {}


def test_regex_outputs_match(tok, model):
    pattern = r"(red|blue) [a-z]{1,5}( [0-9]{2})?"  # at most 17 characters
    grammar = regex_grammar(tok, model.config.vocab_size, pattern)
    requests = [(p, GREEDY, {"constraint": grammar}) for p in PROMPTS] + \
               [(PROMPTS[s % 3], sampled(s), {"constraint": grammar}) for s in range(8)]
    outputs = [c[0] for c in run_all(Engine(model, tok), requests)]
    for out in outputs:
        # eos may come wherever the match is complete; otherwise the grammar ends the sample at its longest
        assert out.finish_reason in ("eos", "stop"), out
        assert re.fullmatch(pattern, out.text), out.text
    assert len({o.text for o in outputs}) > 2


def test_forked_samples_each_follow_the_grammar(tok, model):
    schema = SCHEMAS["enum_and_array"]
    grammar = json_schema_grammar(tok, model.config.vocab_size, schema)
    engine = Engine(model, tok)
    sampled_id = engine.add_request(PROMPTS[1], sampled(5), n=4, constraint=grammar)
    greedy_id = engine.add_request(PROMPTS[0], GREEDY, n=3, constraint=grammar)
    engine.run_until_done([sampled_id, greedy_id])
    forks, greedy = engine.completions(sampled_id), engine.completions(greedy_id)
    for out in forks + greedy:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in forks}) > 1 and len({o.text for o in greedy}) == 1


def test_unconstrained_requests_in_the_batch_are_unchanged(tok, model):
    grammar = json_schema_grammar(tok, model.config.vocab_size, SCHEMAS["person"])
    free = [(PROMPTS[0], GenerationConfig(max_new_tokens=40, temperature=0.0, eos=False), {}),
            (PROMPTS[2], GenerationConfig(max_new_tokens=40, temperature=1.0, seed=9), {"n": 2})]
    alone = run_all(Engine(model, tok), free)
    mixed = run_all(Engine(model, tok, max_seqs=8), [free[0], (PROMPTS[1], GREEDY, {"constraint": grammar}),
                                                     free[1], (PROMPTS[0], sampled(1), {"constraint": grammar})])
    assert [mixed[0], mixed[2]] == alone


def test_logprobs_are_the_models_own_and_preemption_keeps_the_state(tok, model):
    """Logprobs come from the unmasked logits; a cache small enough to preempt gives the same outputs."""
    schema = SCHEMAS["nested"]
    grammar = json_schema_grammar(tok, model.config.vocab_size, schema)
    greedy = GenerationConfig(max_new_tokens=48, temperature=0.0)  # the longest output has 43 bytes
    requests = [(p, greedy, {"constraint": grammar, "logprobs": 1}) for p in PROMPTS * 2]
    roomy = run_all(Engine(model, tok), requests)
    tight = Engine(model, tok, block_size=4, num_blocks=24, max_seqs=6)
    assert run_all(tight, requests) == roomy
    assert tight.stats()["preemptions"] > 0

    engine = Engine(model, tok)
    request_id = engine.add_request(PROMPTS[0], GREEDY, constraint=grammar, logprobs=1)
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    scores = [s for out in outputs for s in out.logprobs]
    generated = [s.token for s in scores]
    assert generated == engine.completions(request_id)[0].token_ids
    prompt = tok.encode(PROMPTS[0])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + generated]))[0, len(prompt) - 1:-1].float(), -1)
    assert [s.logprob for s in scores] == pytest.approx(logp.gather(1, torch.tensor(generated)[:, None])[:, 0]
                                                        .tolist(), abs=1e-4)
    # the mask changed the pick: the model's own favourite was another token at some step
    assert any(next(iter(s.top)) != s.token for s in scores)


# ---- the state on its own ----------------------------------------------------------------------------------------

def test_state_masks_padding_allows_stop_ids_only_when_complete_and_then_only_them(tok, model):
    vocab_size = model.config.vocab_size
    grammar = regex_grammar(tok, vocab_size, "ab(cd)?")
    assert isinstance(grammar, Grammar) and ll_tokenizer(tok) is grammar.ll_tokenizer  # cached per Tokenizer
    stop = tok.chat_stop_ids
    state = grammar.new_state(stop)
    logits = torch.zeros(vocab_size)
    state.mask_logits(logits)
    allowed = torch.isfinite(logits)
    assert not allowed[tok.vocab_size:].any() and not allowed[stop].any()
    assert allowed[tok.encode("a")[0]] and not allowed[tok.encode("b")[0]]
    for token in tok.encode("ab"):
        state.accept(token)
    batch = state.mask_logits(torch.zeros(1, vocab_size))  # (1, V) too
    assert state.accepting and not state.finished
    assert torch.isfinite(batch[0, stop]).all() and torch.isfinite(batch[0, tok.encode("c")[0]])
    with pytest.raises(LmforgeError, match="not allowed"):
        grammar.new_state(stop).accept(tok.encode("b")[0])
    for token in tok.encode("cd"):
        state.accept(token)
    assert state.finished
    assert torch.isfinite(state.mask_logits(torch.zeros(vocab_size))).nonzero()[:, 0].tolist() == sorted(stop)
    state.accept(stop[0])
    with pytest.raises(LmforgeError, match="complete"):
        state.accept(tok.encode("a")[0])
    done = grammar.new_state(())  # no stop ids: nothing may follow a complete output
    for token in tok.encode("abcd"):
        done.accept(token)
    with pytest.raises(LmforgeError, match="no stop id"):
        done.mask_logits(torch.zeros(vocab_size))


def test_bad_schemas_regexes_and_formats_are_config_errors(tok, model):
    vocab_size = model.config.vocab_size
    bad_schemas = [{"type": "objec"}, {"type": "string", "maxLength": -1}, {"type": "array", "uniqueItems": True},
                   {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"],
                    "additionalProperties": False}, '{"type": "object"}',
                   {"type": "integer", "minimum": 1, "exclusiveMinimum": True},  # draft-04's form: meta-schema
                   {"type": "string", "pattern": "[a-"}]
    for schema in bad_schemas:
        with pytest.raises(ConfigError, match="^json_schema"):
            json_schema_grammar(tok, vocab_size, schema)
    with pytest.raises(ConfigError, match=r"^regex: .*unclosed"):
        regex_grammar(tok, vocab_size, "[a-z")
    with pytest.raises(ConfigError, match=r"^response_format\.json_schema\.schema: Invalid type: objec"):
        response_format_grammar(tok, vocab_size, {"type": "json_schema", "json_schema": {"schema": {"type": "objec"}}})
    with pytest.raises(ConfigError, match=r"^response_format\.type"):
        response_format_grammar(tok, vocab_size, {"type": "xml"})
    engine = Engine(model, tok)
    with pytest.raises(ConfigError, match="vocab_size"):
        engine.add_request("a", GREEDY, constraint=json_object_grammar(tok, tok.vocab_size))
    assert response_format_grammar(tok, vocab_size, {"type": "text"}) is None
    schema = SCHEMAS["pattern"]
    grammar = response_format_grammar(tok, vocab_size, {"type": "json_schema", "json_schema": {
        "name": "code", "schema": schema, "strict": True}})
    out = engine.generate(PROMPTS, GREEDY, constraint=grammar)
    for completion in out:
        jsonschema.validate(json.loads(completion.text), schema)
    regex = response_format_grammar(tok, vocab_size, {"type": "regex", "regex": "[0-9]{3}"})
    assert [re.fullmatch("[0-9]{3}", c.text) is not None for c in engine.generate(PROMPTS, GREEDY, constraint=regex)]\
        == [True] * 3
