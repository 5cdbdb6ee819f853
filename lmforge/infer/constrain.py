"""Structured output: grammar-constrained decoding with llguidance (a JSON schema, any JSON object, or a regex).

    grammar = json_schema_grammar(tokenizer, model.config.vocab_size, {"type": "object", ...})  # once per request
    state = grammar.new_state(stop_ids=[tokenizer.eos_id])                                     # once per sample
    while not state.finished:
        logits = ...                          # (1, V) or (V,) next-token logits
        state.mask_logits(logits)             # in place: tokens the grammar forbids -> -inf
        token = pick(logits)
        if token in stop_ids: break
        state.accept(token)

A `Grammar` is compiled and checked once (a bad schema or regex is a ConfigError naming it); each sample gets its
own `GrammarState` (a copy of the compiled matcher, cheap). The mask is computed by llguidance over the tokenizer's
bytes, so any tokenization of a valid output is allowed, not only the canonical one. Ids the tokenizer does not
have (a model's vocab_size may be padded beyond it) are always masked. End of sequence: the request's stop ids (a
chat turn's end token, or eos) are allowed exactly when the output so far is complete; once nothing else can follow
(`finished`), they are all that is allowed. JSON is compact (no whitespace between tokens): whitespace the grammar
allows is whitespace a random or weak model can emit forever.

The llguidance tokenizer is built from the tokenizer.json text (no `transformers` needed) once per Tokenizer
object and cached.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any, Mapping, Optional, Sequence

import llguidance
import torch

from lmforge.errors import ConfigError, LmforgeError, TokenizerMismatchError

# Compact JSON: no whitespace between tokens (llguidance's flexible whitespace is unbounded). Overrides, so a
# schema's own "x-guidance" options cannot turn it back on.
JSON_OPTIONS = {"whitespace_flexible": False}

_ll_tokenizers: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_ll_tokenizers_lock = threading.Lock()  # grammars are built in server threads while the engine thread decodes


def ll_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of an lmforge Tokenizer (its token bytes and special tokens), built from
    `tokenizer._json` on first use and cached per Tokenizer object (it takes ~1 s for a 100k vocabulary)."""
    with _ll_tokenizers_lock:
        cached = _ll_tokenizers.get(tokenizer)
        if cached is None:
            try:
                cached = llguidance.LLTokenizer(tokenizer._json, eos_token=tokenizer.eos_id)
            except Exception as exc:  # the Rust side raises plain ValueError/RuntimeError with its reason
                raise TokenizerMismatchError(f"tokenizer {tokenizer!r}: llguidance cannot read its tokenizer.json "
                                             f"for constrained decoding ({_one_line(str(exc))})") from None
            _ll_tokenizers[tokenizer] = cached
        return cached


class Grammar:
    """A grammar compiled for one tokenizer and model vocabulary; `new_state()` starts a sample in it.

    Build it with `json_schema_grammar`, `json_object_grammar` or `regex_grammar`. `description` says what it is
    (for messages). Thread-safe to share: new_state copies the compiled matcher, which is never advanced itself."""

    def __init__(self, tokenizer: Any, vocab_size: int, grammar: str, description: str, field: str) -> None:
        """`grammar` is llguidance's grammar text (from LLMatcher.grammar_from_*); a ConfigError naming `field`
        if it does not compile."""
        if int(vocab_size) < 1:
            raise ConfigError(f"constrained decoding: vocab_size={vocab_size!r}, expected an integer >= 1")
        self.tokenizer, self.vocab_size, self.description = tokenizer, int(vocab_size), description
        self.ll_tokenizer = ll_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise ConfigError(f"{field}: {_one_line(self._matcher.get_error())}")

    def new_state(self, stop_ids: Sequence[int] = ()) -> "GrammarState":
        """A fresh sample at the grammar's start; `stop_ids` end the sample (allowed once the output is
        complete), e.g. the request's eos ids."""
        return GrammarState(self, self._matcher.deep_copy(), stop_ids)

    def __repr__(self) -> str:
        return f"Grammar({self.description}, vocab_size={self.vocab_size})"


class GrammarState:
    """One sample's place in a Grammar: which tokens may come next (`allowed`, `mask_logits`), `accept` to
    advance by the token chosen, and `finished` once the output is complete and nothing but a stop id can follow
    (or a stop id was accepted)."""

    def __init__(self, grammar: Grammar, matcher: llguidance.LLMatcher, stop_ids: Sequence[int]) -> None:
        self.grammar = grammar
        self.stop_ids = tuple(int(t) for t in stop_ids)
        bad = [t for t in self.stop_ids if not 0 <= t < grammar.vocab_size]
        if bad:
            raise ConfigError(f"constrained decoding: stop ids {bad} are outside the vocabulary "
                              f"(0-{grammar.vocab_size - 1})")
        self._matcher = matcher
        self._stopped = False  # a stop id was accepted
        self._shifts: dict[torch.device, torch.Tensor] = {}

    @property
    def finished(self) -> bool:
        """True when the grammar is complete and can take no more tokens except a stop id (or took one)."""
        return self._stopped or (self._matcher.is_stopped() and not self._matcher.is_error())

    @property
    def accepting(self) -> bool:
        """True when the output so far is a complete match (a stop id may come next)."""
        return self._stopped or self._matcher.is_accepting()

    def allowed(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A (vocab_size,) bool tensor on `device`: True for each token that may come next."""
        if self.finished and not self.stop_ids:
            raise LmforgeError(f"constrained decoding ({self.grammar.description}): the output is complete and the "
                               "request has no stop id; stop at `finished` instead of asking for another token")
        device = torch.device(device)
        allowed = torch.zeros(self.grammar.vocab_size, dtype=torch.bool, device=device)
        if not self.finished:
            packed = self._matcher.compute_bitmask()  # one bit per tokenizer id, little-endian within each byte
            self._check()
            known = min(self.grammar.ll_tokenizer.vocab_size, self.grammar.vocab_size)
            if device not in self._shifts:
                self._shifts[device] = torch.arange(8, dtype=torch.uint8, device=device)
            bits = torch.frombuffer(bytearray(packed), dtype=torch.uint8).to(device)
            allowed[:known] = ((bits[:, None] >> self._shifts[device]) & 1).flatten()[:known].bool()
            # llguidance allows its own eos when the match is complete; the request's stop ids stand for it
            allowed[[t for t in self.grammar.ll_tokenizer.eos_tokens if t < known]] = False
        if self.accepting and self.stop_ids:
            allowed[list(self.stop_ids)] = True
        return allowed

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of tokens the grammar forbids to -inf, in place, on a (1, V) or (V,) tensor of the
        model's vocabulary; returns `logits`."""
        if logits.shape[-1] != self.grammar.vocab_size:
            raise ConfigError(f"constrained decoding: logits have {logits.shape[-1]} columns but the grammar was "
                              f"built for vocab_size {self.grammar.vocab_size}")
        return logits.masked_fill_(~self.allowed(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance by the token that was chosen; an LmforgeError if the grammar does not allow it."""
        token = int(token)
        if self.finished:
            if token in self.stop_ids and not self._stopped:
                self._stopped = True
                return
            raise LmforgeError(f"constrained decoding ({self.grammar.description}): token {token} after the "
                               "output was complete")
        if token in self.stop_ids:
            if not self._matcher.is_accepting():
                raise LmforgeError(f"constrained decoding ({self.grammar.description}): stop token {token} before "
                                   "the output is complete")
            self._stopped = True
            return
        if token >= self.grammar.ll_tokenizer.vocab_size or not self._matcher.consume_token(token):
            raise LmforgeError(f"constrained decoding ({self.grammar.description}): token {token} is not allowed "
                               f"here ({_one_line(self._matcher.get_error()) or 'outside the vocabulary'})")

    def _check(self) -> None:
        # only resource limits (a grammar too complex for one step) put a matcher in error while masking
        if self._matcher.is_error():
            raise LmforgeError(f"constrained decoding ({self.grammar.description}): "
                               f"{_one_line(self._matcher.get_error())}")


# ---- builders -------------------------------------------------------------------------------------------------

def json_schema_grammar(tokenizer: Any, vocab_size: int, schema: Mapping[str, Any], *,
                        field: str = "json_schema") -> Grammar:
    """Outputs that are compact JSON valid under `schema` (a JSON Schema as a dict). A ConfigError naming `field`
    if the schema is not a JSON object, breaks the JSON Schema meta-schema, uses a keyword llguidance cannot
    enforce (e.g. uniqueItems), or no value satisfies it. Properties come in the schema's order; a schema
    without "additionalProperties": false admits other properties too (after the listed ones)."""
    if not isinstance(schema, Mapping):
        raise ConfigError(f"{field}: expected a JSON Schema object, got {type(schema).__name__}")
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=JSON_OPTIONS)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: {_one_line(str(exc))}") from None
    title = schema.get("title")
    grammar = Grammar(tokenizer, vocab_size, text, f"json schema {title}" if isinstance(title, str) else
                      "json schema", field)
    _check_schema(schema, field)  # after llguidance, whose messages are the clearer; it lets a few through
    return grammar


def json_object_grammar(tokenizer: Any, vocab_size: int) -> Grammar:
    """Any compact JSON object (OpenAI's response_format {"type": "json_object"})."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    return Grammar(tokenizer, vocab_size, grammar, "json object", "json_object")


def regex_grammar(tokenizer: Any, vocab_size: int, pattern: str, *, field: str = "regex") -> Grammar:
    """Outputs that match `pattern` as a whole (Rust `regex` syntax, which is Python's for common patterns; no
    look-around or back-references). A ConfigError naming `field` if the pattern is not a valid regex."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{field}: expected a non-empty regular expression string, got {pattern!r}")
    return Grammar(tokenizer, vocab_size, llguidance.LLMatcher.grammar_from_regex(pattern),
                   f"regex {pattern!r}"[:80], field)


def response_format_grammar(tokenizer: Any, vocab_size: int, response_format: Optional[Mapping[str, Any]], *,
                            field: str = "response_format") -> Optional[Grammar]:
    """The Grammar for an OpenAI `response_format`: None for absent or {"type": "text"}; {"type": "json_object"};
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}} (the schema is
    enforced whatever `strict` says); and lmforge's {"type": "regex", "regex": "..."}. ConfigError naming the
    field otherwise."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar(tokenizer, vocab_size)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise ConfigError(f"{field}.json_schema: expected an object with a 'schema' object")
        return json_schema_grammar(tokenizer, vocab_size, spec.get("schema", {}), field=f"{field}.json_schema.schema")
    if kind == "regex":
        return regex_grammar(tokenizer, vocab_size, response_format.get("regex"), field=f"{field}.regex")
    raise ConfigError(f"{field}.type: expected text, json_object, json_schema or regex, got "
                      f"{json.dumps(kind) if kind is not None else 'nothing'}")


def _check_schema(schema: Mapping[str, Any], field: str) -> None:
    """A ConfigError naming the first place where `schema` breaks its draft's meta-schema (2020-12 by default)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ConfigError(f"{field}: {_one_line(exc.message)} (at /{where})") from None


def _one_line(message: str, limit: int = 300) -> str:
    return " ".join(message.split())[:limit]
