"""`lmforge serve`'s config, in a module without torch so that the CLI's help loads fast."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError


@dataclass
class ServeConfig:
    """Serve one or more model dirs; a request names its model by the dir's name (or the --name given)."""

    model: list[str] = field(default_factory=list)  # model dirs (lmforge or Hugging Face) to serve
    name: list[str] = field(default_factory=list)  # the names clients use, one per model (default: dir names)
    host: str = "127.0.0.1"  # the address to listen on (0.0.0.0: every interface)
    port: int = 8000
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch's CPU threads for the models (0: torch's default, every core); leave a core to the
                      # HTTP side when serving from a CPU with few cores
    max_seqs: int = 64  # sequences each model's engine runs at once
    max_batch_tokens: int = 512  # tokens each engine step feeds (decodes + prompt chunks)
    kv_cache_mb: float = 1024.0  # each model's paged KV cache, at most
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    api_key: list[str] = field(default_factory=list)  # accepted keys (Authorization: Bearer KEY); none: open
    api_keys_file: str = ""  # a file of accepted keys, one per line (# comments)
    rate_limit: float = 0.0  # requests per minute per key (or per client address without keys); 0 = no limit
    max_request_bytes: int = 1_000_000  # a larger request body is refused (413)
    cors_origins: list[str] = field(default_factory=list)  # origins allowed by CORS; none: CORS off
    cache: str = "off"  # response cache of deterministic requests: off | sqlite ($LMFORGE_CACHE/serve/) |
                        # PATH.sqlite | redis://HOST:PORT[/DB]
    cache_max_entries: int = 100_000  # the SQLite cache keeps the most recently used entries up to this
    semantic_cache: float = 0.0  # > 0: also answer a prompt whose embedding's cosine similarity to an earlier
                                 # prompt's (same model and parameters) is at least this (e.g. 0.97); 0 = off
    log: str = ""  # request log file: PATH.jsonl or PATH.sqlite ("" = none)
    log_max_mb: float = 100.0  # rotate the log when it grows past this
    log_backups: int = 5  # rotated log files kept (PATH.1 ... PATH.N)
    redact_pii: bool = False  # replace e-mail addresses, phone, card and ID numbers, IPs in the log by tags
    guardrails: str = ""  # a YAML/JSON file of output validators and the prompt-injection detector ("" = none)

    def __post_init__(self) -> None:
        if self.name and len(self.name) != len(self.model):
            raise ConfigError(f"serve: {len(self.name)} --name for {len(self.model)} model dirs; give one per model")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve port={self.port}: expected 0-65535")
        if self.threads < 0:
            raise ConfigError(f"serve threads={self.threads}: expected 0 (torch's default) or more")
        if self.max_seqs < 1 or self.max_batch_tokens < 1 or self.max_tokens_limit < 1:
            raise ConfigError("serve: max_seqs, max_batch_tokens and max_tokens_limit must be >= 1")
        if self.rate_limit < 0 or self.max_request_bytes < 1:
            raise ConfigError("serve: rate_limit must be >= 0 and max_request_bytes >= 1")
        if not 0 <= self.semantic_cache <= 1:
            raise ConfigError(f"serve semantic_cache={self.semantic_cache}: expected a similarity in (0, 1], or 0")
        if self.semantic_cache and self.cache == "off":
            raise ConfigError("serve semantic_cache: needs a response cache (--cache sqlite or redis://...)")
        if self.log_max_mb <= 0 or self.log_backups < 0 or self.cache_max_entries < 1:
            raise ConfigError("serve: log_max_mb must be > 0, log_backups >= 0 and cache_max_entries >= 1")

    def keys(self) -> set[str]:
        """The accepted API keys: --api_key values and the lines of --api_keys_file."""
        keys = set(self.api_key)
        if self.api_keys_file:
            try:
                lines = open(self.api_keys_file, encoding="utf-8").read().splitlines()
            except OSError as exc:
                raise ConfigError(f"serve api_keys_file={self.api_keys_file!r}: cannot read it ({exc.strerror})")
            keys |= {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
        return keys
