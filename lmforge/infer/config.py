"""The generation configs, in a module without torch so that the CLI's help loads fast: `GenerationConfig` (how to
pick tokens and when to stop; used by generate, chat, eval and the server) and `GenerateConfig` (`lmforge generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from lmforge.errors import ConfigError


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop. The filters apply in this order: repetition penalty, temperature,
    top-k, top-p (see lmforge.infer.sampling). max_new_tokens is clamped so that prompt + new tokens fit the
    model's block_size; a prompt that leaves no room at all raises PromptTooLongError."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 -> greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the most likely tokens up to this probability mass; 1.0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output; 1.0 = off
    stop: list[str] = field(default_factory=list)  # end a row when its text contains one (cut from the text)
    seed: Optional[int] = None  # seeds a private generator: the same seed gives the same samples
    use_cache: bool = True  # False recomputes the whole sequence every step (slow; a reference for tests)
    # compile: 1.3-2.1x the tokens/s of eager decoding, after 20-100 s of compiling per model, batch size and cache
    # length. Cached on disk, but a new process takes 3-5 s to load its first compiled step (measured 2026-11-30),
    # so it pays in long-lived processes and long generations, not in one short `lmforge generate`
    compile: bool = False  # CPU: decode through a step compiled ahead of time (pays in long-lived processes:
                           # a new process needs 3-5 s to load the step; see README)
    eos: bool = True  # end a row at the eos token (the tokenizer's, or generate's eos_id)

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "at least 1"),
            (self.temperature >= 0, "temperature", ">= 0 (0 is greedy)"),
            (self.top_k >= 0, "top_k", ">= 0 (0 is off)"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1] (1 is off)"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 is off)"),
            (all(self.stop), "stop", "non-empty strings"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(f"generation {name}={getattr(self, name)!r}: expected {expected}")


    @classmethod
    def from_transformers(cls, base: Optional["GenerationConfig"] = None, **kwargs: Any) -> "GenerationConfig":
        """A GenerationConfig from the keyword arguments users bring from transformers' generate (and this
        class's own field names): max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample
        (False = greedy, True = sampling at temperature, default 1.0), seed, stop; other names are a ConfigError."""
        fields = {name for name in cls.__dataclass_fields__}
        values = dict(vars(base)) if base is not None else {}
        do_sample = kwargs.pop("do_sample", None)
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ConfigError(f"generate: unknown keyword argument(s) {', '.join(unknown)} (known: do_sample, "
                              f"{', '.join(sorted(fields))})")
        values.update(kwargs)
        if do_sample is False:
            values["temperature"] = 0.0
        elif do_sample is True and values.get("temperature", 1.0) == 0:
            raise ConfigError("generate: do_sample=True needs temperature > 0")
        return cls(**values)


@dataclass
class GenerateConfig(GenerationConfig):
    """`lmforge generate`: every GenerationConfig field (as top-level options) plus the model, prompts and device."""

    model: str = ""  # an lmforge or Hugging Face model dir; the tokenizer is read from the same dir
    prompt: list[str] = field(default_factory=list)  # one or more prompts, generated as one batch
    stream: bool = False  # print text as it is generated (several prompts: one after another)
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N | mps
    quantize: Optional[str] = None  # int8 (per output channel) | int4 (group-wise): weight-only quantized matmuls
    quant_group_size: int = 32  # int4: inputs per scale and zero (32, 64, 128 or 256)
    quant_head: bool = True  # quantize the LM head too (int4 g32: +0.6% perplexity instead of +0.2%, faster)
    draft: Optional[str] = None  # speculative decoding: a draft model dir with the same tokenizer
    prompt_lookup: int = 0  # speculative decoding without a draft: n-gram lookup in the text so far, n <= this
    num_draft_tokens: int = 4  # speculative decoding: tokens proposed per round (k)
    medusa: Optional[str] = None  # a Medusa heads dir trained for this model (lmforge medusa train): tree decoding

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quantize not in (None, "int8", "int4"):
            raise ConfigError(f"generate quantize={self.quantize!r}: expected int8 or int4")
        if sum([self.draft is not None, self.prompt_lookup > 0, self.medusa is not None]) > 1:
            raise ConfigError("generate: choose one of --draft, --prompt_lookup and --medusa")


@dataclass
class ChatConfig(GenerationConfig):
    """`lmforge chat`: every GenerationConfig field plus the model, a system prompt and one-turn mode."""

    model: str = ""  # an lmforge or Hugging Face model dir with a chat template (an sft run's final/)
    system: Optional[str] = None  # a system prompt that opens the conversation
    prompt: Optional[str] = None  # one user turn: print the reply and exit (no interactive session)
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N | mps
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 -> greedy (argmax)
    top_p: float = 0.95  # nucleus: keep the most likely tokens up to this probability mass; 1.0 = off
    quantize: Optional[str] = None  # int8 | int4: weight-only quantized matmuls (see lmforge generate)
    quant_group_size: int = 32  # int4: inputs per scale and zero (32, 64, 128 or 256)
    quant_head: bool = True  # quantize the LM head too
