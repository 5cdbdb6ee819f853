"""The web chat page at `/`: static HTML, CSS and JavaScript (no build step, no external resources) that talks to
the server's own OpenAI API: it lists /v1/models, streams /v1/chat/completions and renders the deltas as they
arrive, with a system prompt, sampling settings, a stop button (which aborts the request on the server) and an
optional API key.

The page and its files carry no secret, so they must be reachable without a key: PAGE_PATHS are the exact paths
this module serves, which the guard lets through like /health.

A browser that aborts a streamed response does not close the connection at once: to reuse it, Chromium first reads
("drains") the rest of the body, for up to 5 s or 16 KB, and the server goes on generating for a client that is gone.
So a server-sent event stream answered to a browser carries `Connection: close`, which makes the connection not
reusable: the abort closes it, and the server aborts the request (its sequences leave the batch) within a step.
Other clients (the openai package, curl) send no `Sec-Fetch-Mode` header and keep their keep-alive connections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from fastapi import FastAPI
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"
# path -> (file under STATIC_DIR, media type); only these files are served (no directory listing or traversal)
PAGE_FILES = {"/": ("chat.html", "text/html; charset=utf-8"),
              "/static/chat.css": ("chat.css", "text/css; charset=utf-8"),
              "/static/chat.js": ("chat.js", "text/javascript; charset=utf-8")}
PAGE_PATHS = frozenset(PAGE_FILES)


def install(app: FastAPI) -> None:
    """Add GET routes for the chat page (`/`) and its stylesheet and script (`/static/chat.css`, `/static/chat.js`)
    to `app`; the page calls the API with relative URLs, so it also works behind a proxy under a path prefix."""
    for path, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(path, _file_route(STATIC_DIR / name, media_type), methods=["GET"],
                          include_in_schema=False)
    app.add_middleware(CloseBrowserStreams)


class CloseBrowserStreams:
    """ASGI middleware: `Connection: close` on a text/event-stream response to a browser (a request with a
    Sec-Fetch-Mode header), so that a stop in the page reaches the server at once (see the module's docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not any(name == b"sec-fetch-mode" for name, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return

        async def send_closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and any(
                    name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message.get("headers", [])):
                message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


def _file_route(file: Path, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    async def serve_file() -> FileResponse:
        # no-cache: the browser revalidates (ETag) so that an upgraded lmforge never runs a stale script
        return FileResponse(file, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return serve_file
