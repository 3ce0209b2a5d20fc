"""
The web dashboard's static files, served by the program itself: no build step,
no CDN, nothing fetched from elsewhere.  The API and metrics are mounted beside
them by whoever builds the admin site.
"""

from __future__ import annotations

from pathlib import Path

from twisted.web.resource import NoResource, Resource

STATIC = Path(__file__).parent / "static"

ASSETS = {
    b"index.html": b"text/html; charset=utf-8",
    b"app.js": b"text/javascript; charset=utf-8",
    b"style.css": b"text/css; charset=utf-8",
}
"""Every file the page uses, with its content type; nothing else is served."""

POLICY = (b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
          b"form-action 'self'")
"""The page loads only what this program serves, and may not be framed."""


class Asset(Resource):
    """One static file, read at start-up, sent with its type and no caching; it has no children."""

    def __init__(self, body: bytes, contentType: bytes) -> None:
        super().__init__()
        self.body = body
        self.contentType = contentType

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", self.contentType)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", POLICY)
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self.body


class Dashboard(Resource):
    """The site's root: C{/} is the page, its assets are children, anything else is 404."""

    def getChild(self, path: bytes, request) -> Resource:
        if path == b"":
            return self.children[b"index.html"]
        return NoResource()


def dashboardResource() -> Resource:
    """The dashboard at C{/}; mount the API and metrics on it with C{putChild}."""
    root = Dashboard()
    for name, contentType in ASSETS.items():
        root.putChild(name, Asset((STATIC / name.decode()).read_bytes(), contentType))
    return root
