"""The OpenAI API's request bodies (pydantic models that refuse unknown or mistyped fields), its error shape, and
the log-probability objects of its responses."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


class ResponseFormat(BaseModel):
    """text; json_object (any JSON object); json_schema ({"name", "schema", "strict"}: output valid against the
    schema); regex (lmforge's own: the whole output matches `regex`). Enforced by constrained decoding."""
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema", "regex"]
    json_schema: Optional[dict[str, Any]] = None
    regex: Optional[str] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk, with no choices, carries the request's token usage


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=-2**63, le=2**64 - 17)  # a torch.Generator's seed, one per sample
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    echo: bool = False  # the prompt before the completion (with its log-probabilities when logprobs is set)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # top-k log-probabilities per token


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes (what openai asks)
    user: Optional[str] = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = None
    tokens: list[int]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A turn; `content` a string or a list of text parts (joined); `developer` is OpenAI's newer name for system."""
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_turn(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


def error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
          code: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class ApiError(Exception):
    """A request the server refuses: becomes error(status, message, ...) in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return error(self.status, self.message, kind, self.param, self.code)


def prompt_ids(prompt: Any, tokenizer: Any, vocab_size: int, field: str = "prompt") -> list[list[int]]:
    """The prompts of a completions request as token ids: a string, a list of strings, token ids, or lists of ids
    (each id checked to be in the model's vocabulary)."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise ApiError(400, f"{field} is empty", field)
    prompts = [list(prompt)] if all(isinstance(p, int) for p in prompt) else \
        [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if any(not 0 <= t < vocab_size for ids in prompts for t in ids):
        raise ApiError(400, f"{field}: token ids must be in [0, {vocab_size})", field)
    return prompts


def completion_logprobs(tokenizer: Any, echoed: list[int], prompt_scores: list[Any],
                         scores: list[Any]) -> dict[str, Any]:
    """The completions API's logprobs object: tokens, token_logprobs, top_logprobs and text_offset, the echoed
    prompt's first (whose first token has no log-probability: None) and then the generated tokens'."""
    tokens, values, tops = [], [], []
    for position, token in enumerate(echoed):
        score = prompt_scores[position - 1] if position else None
        tokens.append(token)
        values.append(score.logprob if score else None)
        tops.append({tokenizer.decode([t]): v for t, v in score.top.items()} if score else None)
    for score in scores:
        tokens.append(score.token)
        values.append(score.logprob)
        tops.append({tokenizer.decode([t]): v for t, v in score.top.items()})
    texts = [tokenizer.decode([t]) for t in tokens]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, scores: list[Any]) -> dict[str, Any]:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: int, value: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, v) for t, v in s.top.items()]}
                        for s in scores]}
