"""`lmforge serve MODEL_DIR [MODEL_DIR ...]`: load the models, give each an engine thread, serve the OpenAI API.

    lmforge serve runs/sft/final --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "final", "messages": [{"role": "user", "content": "hi"}]}'

uvicorn runs the app; SIGTERM or Ctrl-C stops accepting connections and lets the requests in flight finish.
"""

from __future__ import annotations

import contextlib
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
    """name -> ServedModel for every model dir of cfg (each with its own engine thread)."""
    from lmforge.convert import load_with_tokenizer
    from lmforge.infer.engine import Engine
    from lmforge.serve.engine_thread import EngineThread
    from lmforge.serve.openai_api import ServedModel

    if not cfg.model:
        raise ConfigError("serve needs at least one model dir: lmforge serve MODEL_DIR [MODEL_DIR ...]")
    names = served_names(cfg)
    if len(set(names)) != len(names):
        raise ConfigError(f"serve: two models would be named alike ({', '.join(names)}); name them with --name")
    served = {}
    for name, directory in zip(names, cfg.model):
        model, tokenizer = load_with_tokenizer(directory, cfg.device)
        model.eval()
        engine = Engine(model, tokenizer, max_seqs=cfg.max_seqs, max_batch_tokens=cfg.max_batch_tokens,
                        kv_cache_mb=cfg.kv_cache_mb)
        served[name] = ServedModel(name, EngineThread(engine), tokenizer, model.config.block_size, int(time.time()),
                                   model)
    return served


def make_server(cfg: ServeConfig) -> Any:
    """A uvicorn.Server for cfg (not started): `server.run()` blocks; tests run it in a thread."""
    import uvicorn

    from lmforge.serve.openai_api import build_app

    from lmforge.serve.guard import install

    keys = cfg.keys()
    models = load_models(cfg)
    app = build_app(models, cfg.max_tokens_limit)
    install(app, keys, cfg.rate_limit, cfg.max_request_bytes, cfg.cors_origins)

    app.router.on_shutdown.append(lambda: [model.engine.stop() for model in models.values()])
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
