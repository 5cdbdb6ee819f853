"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): train, save, load, encode, decode, chat template.

Text is split by a GPT-4-style regex (letters, 1-2 digit numbers, punctuation runs, whitespace), each piece is
mapped to bytes (the 256 byte tokens are always in the vocabulary, so there is no unknown token), and BPE merges
are learned on those bytes. decode(encode(s)) == s for every valid Unicode string: nothing is normalized,
stripped or prefixed. A `str` holding a lone surrogate is not valid Unicode and is a DataError.

Special tokens take the lowest ids, in this order: <|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|> <|end|>
<|reserved_0|> ... <|reserved_7|>. Inside ordinary text they are NOT special: `encode("<|eos|>")` gives the ids of
the seven characters, so documents and user messages can never inject control tokens. Pass `allow_special=True`
to turn the exact strings into their ids (for trusted, templated text).

Chat format (`lmforge-chat-v1`): each message is `<|role|>content<|end|>`, messages concatenated with nothing in
between; `add_generation_prompt` appends `<|assistant|>`. The format is a Jinja template (`chat_template`), the
same text an exported Hugging Face tokenizer_config.json carries, so `transformers`' `apply_chat_template` gives the
same ids. `encode_chat` builds the ids with role tokens as specials and contents as plain text (a user cannot
inject a role token); `encode_chat_with_mask` also marks the assistant tokens (what SFT trains on). A tokenizer
imported from a Hugging Face dir keeps that model's own template (rendered with Jinja; its contents are then
tokenized with special tokens recognized, as transformers does).

A tokenizer dir holds `tokenizer.json` (HF format) and `lmforge_tokenizer.json` (special tokens, chat template,
fingerprint = sha256 of the tokenizer.json bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.data.mixture import hash_fraction
from lmforge.data.sources import SourceConfig
from lmforge.errors import ConfigError, DataError, TokenizerMismatchError
from lmforge.io import atomic_path, atomic_write_bytes, atomic_write_json, check_replaceable_dir

# GPT-4 (cl100k) split pattern with numbers in runs of at most two digits, as nanochat uses for small vocabularies.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
_SPECIAL_NAMES = ["bos", "eos", "pad", "system", "user", "assistant", "end", *(f"reserved_{i}" for i in range(8))]
DEFAULT_SPECIAL_TOKENS: dict[str, str] = {name: f"<|{name}|>" for name in _SPECIAL_NAMES}
CHAT_ROLES = ("system", "user", "assistant")
# The legacy description earlier tokenizer dirs carry in place of a template; they get the template below.
_LEGACY_CHAT_TEMPLATE = (
    "lmforge-chat-v1: for each message '<|{role}|>' + content + '<|end|>' (roles system, user, assistant; "
    "nothing between messages); add_generation_prompt appends '<|assistant|>'"
)


def lmforge_chat_template(special_tokens: dict[str, str]) -> str:
    """The lmforge-chat-v1 Jinja template over this tokenizer's role and end token strings."""
    roles = ", ".join(f"'{role}': '{special_tokens[role]}'" for role in CHAT_ROLES)
    return (
        "{#- lmforge-chat-v1: <|role|>content<|end|> per message; the generation prompt is <|assistant|> -#}\n"
        f"{{%- set role_tokens = {{{roles}}} -%}}\n"
        "{%- for message in messages -%}\n"
        "{%- if message['role'] not in role_tokens -%}"
        "{{ raise_exception('chat roles are system, user and assistant, got ' + message['role']) }}{%- endif -%}\n"
        f"{{{{ role_tokens[message['role']] + message['content'] + '{special_tokens['end']}' }}}}\n"
        "{%- endfor -%}\n"
        f"{{%- if add_generation_prompt -%}}{{{{ '{special_tokens['assistant']}' }}}}{{%- endif -%}}"
    )


CHAT_TEMPLATE = lmforge_chat_template(DEFAULT_SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"
LMFORGE_FILE = "lmforge_tokenizer.json"
TOKENIZER_FILES = (TOKENIZER_FILE, LMFORGE_FILE)
MIN_VOCAB_SIZE = 256 + len(DEFAULT_SPECIAL_TOKENS)  # the byte alphabet + the default special tokens


def copy_tokenizer_files(src_dir: str | os.PathLike | None, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in `src_dir` into `dst_dir` (a model dir then stands alone); return names."""
    import shutil

    if not src_dir or not Path(src_dir).is_dir():
        return []
    copied = [name for name in TOKENIZER_FILES if (Path(src_dir) / name).is_file()]
    for name in copied:
        shutil.copy2(Path(src_dir) / name, Path(dst_dir) / name)
    return copied


def model_dir_tokenizer(directory: str | os.PathLike) -> Optional["Tokenizer"]:
    """The tokenizer a model dir carries: its lmforge tokenizer files, else a Hugging Face tokenizer.json whose
    special tokens resolve; None when it has neither."""
    directory = Path(directory)
    if (directory / LMFORGE_FILE).is_file():
        return Tokenizer.load(directory)
    if (directory / TOKENIZER_FILE).is_file():
        try:
            return Tokenizer.from_hf(directory)
        except DataError:
            return None
    return None


class Tokenizer:
    """A byte-level BPE tokenizer with named special tokens; see the module docstring for the contract."""

    def __init__(self, tokenizer_json: str, special_tokens: dict[str, str], chat_template: Optional[str] = None):
        """Build from the text of a HF tokenizer.json and a name -> token map (must name bos, eos and pad);
        chat_template is a Jinja chat template (None: lmforge-chat-v1 when the role tokens exist)."""
        missing = [name for name in ("bos", "eos", "pad") if name not in special_tokens]
        if missing:
            raise ConfigError(f"special_tokens: missing {', '.join(missing)} (got {', '.join(special_tokens)})")
        self._json = tokenizer_json
        self._hf = HFTokenizer.from_str(tokenizer_json)
        self._hf_special = HFTokenizer.from_str(tokenizer_json)
        self._hf.encode_special_tokens = True  # special-token strings in text are tokenized as plain text
        self.special_tokens = dict(special_tokens)
        if chat_template in (None, _LEGACY_CHAT_TEMPLATE) and {*CHAT_ROLES, "end"} <= self.special_tokens.keys():
            chat_template = lmforge_chat_template(self.special_tokens)
        self.chat_template: Optional[str] = chat_template if chat_template != _LEGACY_CHAT_TEMPLATE else None
        self.special_ids: dict[str, int] = {}
        for name, token in self.special_tokens.items():
            token_id = self._hf.token_to_id(token)
            if token_id is None:
                raise TokenizerMismatchError(f"special token {name}={token!r} is not in the vocabulary")
            self.special_ids[name] = token_id
        self.fingerprint = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()

    # ---- construction ----------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: dict[str, str] | None = None,
              min_frequency: int = 2) -> "Tokenizer":
        """Learn BPE merges on `texts` up to `vocab_size` tokens (special tokens and 256 bytes included)."""
        special_tokens = dict(special_tokens or DEFAULT_SPECIAL_TOKENS)
        floor = 256 + len(special_tokens)
        if vocab_size < floor:
            raise ConfigError(f"vocab_size: must be at least {floor} (256 bytes + {len(special_tokens)} special "
                              f"tokens), got {vocab_size}")
        if min_frequency < 1:
            raise ConfigError(f"min_frequency: must be >= 1, got {min_frequency}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=list(special_tokens.values()),  # listed first, so they get ids 0..n-1
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf.to_str(), special_tokens)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer dir written by `save` (DataError naming the path if it is missing or malformed)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"tokenizer dir {directory}: not found")
        tokenizer_json = _read_text(directory / TOKENIZER_FILE)
        meta_path = directory / LMFORGE_FILE
        meta = _read_json(meta_path, hint="use Tokenizer.from_hf for a plain Hugging Face tokenizer")
        special = meta.get("special_tokens") if isinstance(meta, dict) else None
        if not isinstance(special, dict) or not {"bos", "eos", "pad"} <= special.keys():
            raise DataError(f"{meta_path}: expected an object with 'special_tokens' naming bos, eos and pad")
        tokenizer = cls(_checked_hf_json(tokenizer_json, directory / TOKENIZER_FILE), special,
                        meta.get("chat_template"))
        if meta.get("fingerprint") not in (None, tokenizer.fingerprint):
            raise TokenizerMismatchError(f"{meta_path}: fingerprint does not match {directory / TOKENIZER_FILE} "
                                         "(tokenizer.json was changed after it was saved)")
        return tokenizer

    @classmethod
    def from_hf(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a plain HF `tokenizer.json` (a file, or a dir holding one).

        bos/eos/pad come from a sibling `tokenizer_config.json` when present, else from well-known names
        (<|endoftext|>, </s>, <|eos|>, ...); bos and pad fall back to eos. Round trips are exact only if the
        HF tokenizer itself is lossless (byte-level, no normalizer).
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        text = _checked_hf_json(_read_text(file), file)
        vocab = HFTokenizer.from_str(text).get_vocab(with_added_tokens=True)
        config_path = file.parent / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        special: dict[str, str] = {}
        for name, candidates in (("eos", ("<|endoftext|>", "</s>", "<|eos|>", "<eos>", "<|end_of_text|>")),
                                 ("bos", ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>")),
                                 ("pad", ("<|pad|>", "<pad>"))):
            configured = config.get(f"{name}_token") if isinstance(config, dict) else None
            if isinstance(configured, dict):
                configured = configured.get("content")
            found = [configured] if isinstance(configured, str) else [c for c in candidates if c in vocab]
            if found and found[0] in vocab:
                special[name] = found[0]
        if "eos" not in special:
            raise DataError(f"{file}: cannot tell the end-of-text token (no tokenizer_config.json eos_token and "
                            "none of <|endoftext|>, </s>, <|eos|>, <eos> in the vocabulary)")
        special.setdefault("bos", special["eos"])
        special.setdefault("pad", special["eos"])
        for name in (*CHAT_ROLES, "end"):  # lmforge's chat tokens, in an exported lmforge model
            if DEFAULT_SPECIAL_TOKENS[name] in vocab:
                special.setdefault(name, DEFAULT_SPECIAL_TOKENS[name])
        return cls(text, special, hf_chat_template(file.parent, config))

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and lmforge_tokenizer.json into `directory`, each atomically."""
        directory = Path(directory)
        atomic_write_bytes(directory / TOKENIZER_FILE, self._json.encode("utf-8"))
        atomic_write_json(directory / LMFORGE_FILE, {
            "special_tokens": self.special_tokens,
            "bos_token": self.special_tokens["bos"],
            "eos_token": self.special_tokens["eos"],
            "pad_token": self.special_tokens["pad"],
            "chat_template": self.chat_template,
            "fingerprint": self.fingerprint,
        })

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self.special_ids["pad"]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    # ---- encode / decode -------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by bos/eos; special-token strings are plain text by default."""
        hf = self._hf_special if allow_special else self._hf
        try:
            ids = hf.encode(text, add_special_tokens=False).ids
        except (TypeError, UnicodeEncodeError, ValueError):
            raise DataError(_invalid_text(text)) from None
        return self._frame(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """`encode` of each text, run in parallel by `tokenizers`."""
        hf = self._hf_special if allow_special else self._hf
        try:
            encodings = hf.encode_batch(list(texts), add_special_tokens=False)
        except (TypeError, UnicodeEncodeError, ValueError):
            raise DataError(next((_invalid_text(t) for t in texts if not _is_valid(t)), "encode_batch: "
                                 "expected a list of str")) from None
        return [self._frame(e.ids, add_bos, add_eos) for e in encodings]

    def _frame(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; an id sequence that cuts a UTF-8 character in two decodes that part to U+FFFD."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """UTF-8 bytes per token over `texts` (higher = better compression)."""
        texts = list(texts)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) for ids in self.encode_batch(texts))
        if n_tokens == 0:
            raise DataError("bytes_per_token: the texts are empty")
        return n_bytes / n_tokens

    # ---- chat ------------------------------------------------------------------------------------------------

    @property
    def chat_stop_ids(self) -> list[int]:
        """Ids that end an assistant turn when generating: <|end|> (lmforge-chat-v1) and eos."""
        ids = [self.special_ids["end"]] if "end" in self.special_ids else []
        return ids + [self.eos_id] if self.eos_id not in ids else ids

    @property
    def uses_lmforge_chat(self) -> bool:
        return {*CHAT_ROLES, "end"} <= self.special_tokens.keys() and \
            self.chat_template == lmforge_chat_template(self.special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as text, rendered by the chat template (encode it with allow_special=True)."""
        messages = [{"role": role, "content": content} for role, content in self._checked_messages(messages)]
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of `apply_chat_template(messages)`: for lmforge-chat-v1, role tokens as specials and contents as
        plain text (so a special-token string inside a message stays text)."""
        return self.encode_chat_with_mask(messages, add_generation_prompt)[0]

    def encode_chat_with_mask(self, messages: list[dict], add_generation_prompt: bool = False
                              ) -> tuple[list[int], list[bool]]:
        """(ids, mask): mask is True on the tokens of every assistant turn, its content and the token(s) that end
        it (what a chat model learns to produce), False on the rest (system and user turns, role tokens)."""
        checked = self._checked_messages(messages)
        if self.uses_lmforge_chat:
            ids: list[int] = []
            mask: list[bool] = []
            for role, content in checked:
                body = [*self.encode(content), self.special_ids["end"]]
                ids += [self.special_ids[role], *body]
                mask += [False] + [role == "assistant"] * len(body)
            if add_generation_prompt:
                ids.append(self.special_ids["assistant"])
                mask.append(False)
            return ids, mask
        return self._encode_rendered_chat(checked, add_generation_prompt)

    def _encode_rendered_chat(self, checked: list[tuple[str, str]], add_generation_prompt: bool
                              ) -> tuple[list[int], list[bool]]:
        """A foreign template: render, tokenize with special tokens recognized, and find each assistant turn as the
        text between the conversation rendered up to its generation prompt and rendered through the turn."""
        messages = [{"role": role, "content": content} for role, content in checked]
        render = lambda upto, prompt: render_chat_template(  # noqa: E731
            self.chat_template, messages[:upto], prompt, self.special_tokens)
        text = render(len(messages), add_generation_prompt)
        spans = []
        for i, (role, _) in enumerate(checked):
            if role != "assistant":
                continue
            before, through = render(i, True), render(i + 1, False)
            if not (text.startswith(through) and through.startswith(before)):
                raise TokenizerMismatchError("the chat template does not render a conversation as the sum of its "
                                             "turns; cannot tell which tokens are the assistant's")
            spans.append((len(before), len(through)))
        encoding = self._hf_special.encode(text, add_special_tokens=False)
        mask = [any(start <= lo < end for start, end in spans) for lo, _ in encoding.offsets]
        return list(encoding.ids), mask

    def _checked_messages(self, messages: list[dict]) -> list[tuple[str, str]]:
        if self.chat_template is None:
            missing = [name for name in (*CHAT_ROLES, "end") if name not in self.special_tokens]
            raise TokenizerMismatchError(f"chat template needs special tokens {', '.join(missing)}, which this "
                                         "tokenizer lacks")
        checked = []
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in CHAT_ROLES or not isinstance(content, str):
                raise DataError(f"messages[{i}]: expected {{'role': one of {', '.join(CHAT_ROLES)}, 'content': str}}, "
                                f"got {message!r}"[:300])
            checked.append((role, content))
        return checked


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                         special_tokens: dict[str, str]) -> str:
    """Render a Hugging Face style Jinja chat template the way transformers does (sandboxed, trim_blocks,
    lstrip_blocks, `raise_exception`, the special tokens as `bos_token`, `eos_token`, ...)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise DataError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **{f"{name}_token": token for name, token in special_tokens.items()})
    except TemplateError as exc:
        raise DataError(f"chat template: cannot render it ({exc})".splitlines()[0]) from None


def hf_chat_template(directory: Path, config: object) -> Optional[str]:
    """A Hugging Face dir's chat template: chat_template.jinja, else tokenizer_config.json's chat_template (a
    string, or a list of named templates of which 'default' is taken)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return _read_text(jinja_file)
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _is_valid(text: object) -> bool:
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _invalid_text(text: object) -> str:
    if not isinstance(text, str):
        return f"encode: expected str, got {type(text).__name__}"
    return "encode: text contains a lone surrogate, which is not valid Unicode (clean it with " \
           "text.encode('utf-8', 'replace').decode())"


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})".splitlines()[0]) from None


def _read_json(path: Path, hint: str = "") -> object:
    if not path.is_file():
        raise DataError(f"{path}: not found" + (f" ({hint})" if hint else ""))
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None


def _checked_hf_json(text: str, path: Path) -> str:
    """`text` if HF tokenizers can load it, else a DataError naming `path`."""
    try:
        HFTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{path}: not a Hugging Face tokenizer.json ({exc})".splitlines()[0][:300]) from None
    return text


# ---- training stage: `lmforge tokenizer` ---------------------------------------------------------------------

HELDOUT_MAX_CHARS = 10_000_000  # the held-out sample is kept in memory for the report


@dataclass
class TokenizerTrainConfig:
    """Train a tokenizer on text sources and report its compression on held-out documents.

    input: sources as `lmforge data` accepts them (files, dirs, globs, .txt/.jsonl/.parquet, built-in corpus names
    like `wordnet`, with `:key=value` options).
    heldout_fraction: share of documents (chosen by a hash of their text, so the split is deterministic and
    independent of order) kept out of training to measure bytes/token. max_chars: stop reading after this many
    training characters (None = all). cache_dir: where built-in corpora are cached (None = $LMFORGE_CACHE).
    """

    input: list[str] = field(default_factory=lambda: ["stdlib-docstrings"])  # text sources, as `lmforge data` takes
    out_dir: str = "out/tokenizer"  # the tokenizer dir to write (replaced atomically if it exists)
    vocab_size: int = 8192  # tokens in all: 256 bytes + special tokens + merges
    min_frequency: int = 2  # a pair must occur this often to be merged
    heldout_fraction: float = 0.02  # share of documents (by text hash) held out to measure bytes/token
    max_chars: Optional[int] = 100_000_000  # stop reading after this many training characters (None = all)
    cache_dir: Optional[str] = None  # built-in corpus cache; None = $LMFORGE_CACHE or ~/.cache/lmforge

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("input: give at least one text source")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(f"vocab_size: must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                              f"{len(DEFAULT_SPECIAL_TOKENS)} special tokens), got {self.vocab_size}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        if self.max_chars is not None and self.max_chars <= 0:
            raise ConfigError(f"max_chars: must be positive or None, got {self.max_chars}")


def train_tokenizer(cfg: TokenizerTrainConfig) -> dict:
    """Train on cfg.input, save to cfg.out_dir (plus train_report.json), return the report."""
    start = time.time()
    sources = [SourceConfig.from_str(spec) for spec in cfg.input]
    for source in sources:
        source.check()
    check_replaceable_dir(cfg.out_dir, TOKENIZER_FILE, "tokenizer dir")
    stats = {"training_documents": 0, "training_chars": 0, "training_bytes": 0}
    heldout: list[str] = []
    heldout_budget = HELDOUT_MAX_CHARS
    if cfg.max_chars is not None:
        heldout_budget = min(heldout_budget, cfg.heldout_fraction * cfg.max_chars)
    heldout_chars = 0

    def training_texts() -> Iterator[str]:
        nonlocal heldout_chars
        for source in sources:
            for doc in source.documents(cfg.cache_dir):
                if cfg.max_chars is not None and stats["training_chars"] >= cfg.max_chars:
                    return
                if hash_fraction(doc.text, cfg.heldout_fraction):
                    if heldout_chars < heldout_budget:
                        heldout.append(doc.text)
                        heldout_chars += len(doc.text)
                    continue
                stats["training_documents"] += 1
                stats["training_chars"] += len(doc.text)
                stats["training_bytes"] += len(doc.text.encode("utf-8", "replace"))
                yield doc.text

    tokenizer = Tokenizer.train(training_texts(), cfg.vocab_size, min_frequency=cfg.min_frequency)
    if stats["training_documents"] == 0:
        raise DataError(f"input {', '.join(cfg.input)}: no training documents (all empty or held out)")
    report: dict = {"out_dir": str(Path(cfg.out_dir).resolve()), "vocab_size": tokenizer.vocab_size,
                    "fingerprint": tokenizer.fingerprint, **stats, "heldout_documents": len(heldout),
                    "heldout_bytes": sum(len(t.encode("utf-8", "replace")) for t in heldout),
                    "bytes_per_token": None, "chars_per_token": None}
    if heldout and report["heldout_bytes"]:
        bytes_per_token = tokenizer.bytes_per_token(heldout)
        report["bytes_per_token"] = round(bytes_per_token, 4)
        report["chars_per_token"] = round(heldout_chars * bytes_per_token / report["heldout_bytes"], 4)
    report["seconds"] = round(time.time() - start, 2)
    with atomic_path(cfg.out_dir) as build_dir:  # an existing tokenizer dir is replaced only once all is written
        build_dir.mkdir()
        tokenizer.save(build_dir)
        atomic_write_json(build_dir / "train_report.json", report)
    print(f"tokenizer: {report['vocab_size']} tokens trained on {report['training_documents']:,} documents "
          f"({report['training_bytes']:,} bytes) in {report['seconds']} s -> {report['out_dir']}")
    if report["bytes_per_token"] is not None:
        print(f"tokenizer: held-out {report['heldout_documents']:,} documents: "
              f"{report['bytes_per_token']} bytes/token, {report['chars_per_token']} chars/token")
    return report
