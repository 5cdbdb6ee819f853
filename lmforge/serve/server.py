"""`lmforge serve MODEL_DIR [MODEL_DIR ...]`: load the models, give each an engine thread, serve the OpenAI API.

    lmforge serve runs/sft/final --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "final", "messages": [{"role": "user", "content": "hi"}]}'

uvicorn runs the app; SIGTERM or Ctrl-C stops accepting connections and lets the requests in flight finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.serve.config import ServeConfig


def served_names(cfg: ServeConfig) -> list[str]:
    """The names clients give: --name, else each model dir's name."""
    return cfg.name or [Path(m).resolve().name for m in cfg.model]


def load_models(cfg: ServeConfig) -> dict[str, Any]:
    """name -> ServedModel for every model dir of cfg (each with its own engine thread). An adapter dir is served
    as its base with the adapter, under its own name (its own engine: requests to two adapters are not batched
    together)."""
    from lmforge.convert import load_with_tokenizer
    from lmforge.infer.engine import engine_for
    from lmforge.serve.engine_thread import EngineThread
    from lmforge.serve.exchange import ServedModel

    if not cfg.model:
        raise ConfigError("serve needs at least one model dir: lmforge serve MODEL_DIR [MODEL_DIR ...]")
    names = served_names(cfg)
    if len(set(names)) != len(names):
        raise ConfigError(f"serve: two models would be named alike ({', '.join(names)}); name them with --name")
    served = {}
    for name, directory in zip(names, cfg.model):
        model, tokenizer = load_with_tokenizer(directory, cfg.device)
        model.eval()
        engine = engine_for(model, tokenizer, max_seqs=cfg.max_seqs, max_batch_tokens=cfg.max_batch_tokens,
                            kv_cache_mb=cfg.kv_cache_mb)
        if engine is None:
            raise ConfigError(f"serve {directory}: a prefix- or prompt-tuning adapter does not run in the engine; "
                              "serve a model dir or a LoRA, QLoRA or bottleneck adapter dir")
        served[name] = ServedModel(name, EngineThread(engine), tokenizer, model.config.block_size, int(time.time()),
                                   model)
    return served


def make_parts(cfg: ServeConfig, models: dict[str, Any]) -> Any:
    """The response cache, semantic caches, request log and guardrails cfg asks for."""
    from lmforge.data.corpora import default_cache_dir
    from lmforge.serve.cache import model_fingerprint, open_cache
    from lmforge.serve.exchange import ServerParts

    parts = ServerParts(max_tokens_limit=cfg.max_tokens_limit)
    cache_dir = default_cache_dir() / "serve"
    for model, directory in zip(models.values(), cfg.model):
        model.fingerprint = model_fingerprint(directory) if cfg.cache != "off" else ""
    parts.cache = open_cache(cfg.cache, cache_dir, max_entries=cfg.cache_max_entries)
    if cfg.semantic_cache:
        from lmforge.serve.semantic_cache import SemanticCache

        on_disk = cfg.cache == "sqlite" or cfg.cache.endswith((".sqlite", ".db"))
        for name, model in models.items():
            path = Path(parts.cache.path).with_name(f"semantic-{model.fingerprint[:16]}.sqlite") if on_disk else None
            parts.semantic[name] = SemanticCache(_embedder(model), cfg.semantic_cache, path=path,
                                                 embedder=model.fingerprint)
    if cfg.log:
        from lmforge.serve.request_log import RequestLog

        parts.log = RequestLog(cfg.log, max_bytes=int(cfg.log_max_mb * 2**20), backups=cfg.log_backups,
                               redact=cfg.redact_pii)
    if cfg.guardrails:
        from lmforge.serve.guardrails import load_guardrails

        parts.guardrails = load_guardrails(cfg.guardrails)
        parts.guardrails_id = hashlib.sha256(Path(cfg.guardrails).read_bytes()).hexdigest()[:16]
    return parts


def _embedder(model: Any) -> Any:
    """texts -> (N, D) unit vectors from the served model itself (what /v1/embeddings gives)."""
    import numpy as np

    from lmforge.serve.openai_api import embed

    def vectors(texts: list[str]) -> Any:
        ids = [(model.tokenizer.encode(text) or [model.tokenizer.eos_id])[-model.context:] for text in texts]
        return np.asarray(embed(model.lm, ids), dtype=np.float32)

    return vectors


def make_server(cfg: ServeConfig) -> Any:
    """A uvicorn.Server for cfg (not started): `server.run()` blocks; tests run it in a thread."""
    import uvicorn

    from lmforge.serve import webchat
    from lmforge.serve.guard import install
    from lmforge.serve.openai_api import build_app

    keys = cfg.keys()
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    models = load_models(cfg)
    parts = make_parts(cfg, models)
    app = build_app(models, parts=parts)
    webchat.install(app)
    install(app, keys, cfg.rate_limit, cfg.max_request_bytes, cfg.cors_origins)

    def shut_down() -> None:
        for model in models.values():
            model.engine.stop()
        parts.close()

    app.router.on_shutdown.append(shut_down)
    return uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                         timeout_graceful_shutdown=30))


def serve(cfg: ServeConfig) -> None:
    server = make_server(cfg)

    def drain(signum: int, frame: Any) -> None:  # stop accepting, let the requests in flight finish, exit 0
        server.should_exit = True

    # uvicorn's own handlers re-raise the signal after the drain (the process then dies of SIGTERM); ours end
    # the command normally
    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    server.capture_signals = contextlib.nullcontext
    print(f"serving {', '.join(served_names(cfg))} on "
          f"http://{cfg.host}:{cfg.port}/v1 (OpenAI API); Ctrl-C stops", file=sys.stderr, flush=True)
    server.run()
