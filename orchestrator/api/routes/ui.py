"""/ui: the web dashboard's static files (dashboards/ui), served by the app itself so that it works
offline: no CDN, no build step, every script and style from this origin.

The files hold no data and are the same for everyone, so they are served *before* the token guard
(as WhiteNoise serves static files ahead of Django's auth): a browser cannot send a bearer header on
a page load, and the page is where the user types the token. The token then lives in the page's
memory only (never in a URL, a cookie or storage) and every figure it shows comes from the /v1 routes,
behind the same guard and authorization as any other client.

Every answer carries a strict Content-Security-Policy: scripts and styles from this origin only, no
inline script, no eval, no plugins, no framing; user-supplied text is set with ``textContent`` in the
page (dashboards/ui/dom.js), and the policy is the second line of defence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from starlette.types import ASGIApp, Receive, Scope, Send

PREFIX = "/ui"
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Revalidate on every load (answered by a 304 through the ETag), so an upgraded service shows its
# new page at once and never a mix of old and new modules.
_COMMON_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """The dashboard's files by name, read once: the ``dashboards`` package's ``ui`` folder (package
    data, so an editable and a wheel install both find it). Only known file types are served."""
    folder = files("dashboards") / "ui"
    assets = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in CONTENT_TYPES:
            body = entry.read_bytes()
            assets[entry.name] = Asset(body, CONTENT_TYPES[suffix], f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    if "index.html" not in assets:
        raise RuntimeError(f"the dashboard's index.html is missing from {folder}")
    return assets


class UiAssets:
    """Pure ASGI layer answering GET and HEAD under ``/ui`` from the loaded files; every other request
    goes on to the app (and its token guard). ``/ui`` redirects to ``/ui/`` so that the page's
    relative module paths resolve under it."""

    def __init__(self, app: ASGIApp, assets: dict[str, Asset] | None = None):
        self.app = app
        self.assets = assets if assets is not None else load_assets()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, b"method not allowed\n", "text/plain; charset=utf-8", [(b"allow", b"GET, HEAD")])
            return
        if path == PREFIX:
            await _answer(send, 308, b"", "text/plain; charset=utf-8", [(b"location", f"{PREFIX}/".encode())])
            return
        asset = self.assets.get(path[len(PREFIX) + 1:] or "index.html")
        if asset is None:
            await _answer(send, 404, b"no such file\n", "text/plain; charset=utf-8")
            return
        etag = asset.etag.encode()
        if any(name == b"if-none-match" and etag in value for name, value in scope["headers"]):
            await _answer(send, 304, b"", asset.content_type, [(b"etag", etag)], head=True)
            return
        await _answer(send, 200, asset.body, asset.content_type, [(b"etag", etag)],
                      head=scope["method"] == "HEAD")


async def _answer(send: Send, code: int, body: bytes, content_type: str,
                  extra: list[tuple[bytes, bytes]] | None = None, head: bool = False) -> None:
    length = [] if code == 304 else [(b"content-length", str(len(body)).encode())]
    headers = [(b"content-type", content_type.encode()), *length, *_COMMON_HEADERS, *(extra or [])]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})
