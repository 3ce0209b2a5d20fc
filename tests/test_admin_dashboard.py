"""
The dashboard's static files: each with its own content type, the page at
C{/}, and nothing else (no directory listing, no file outside the list).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from gotunnel.admin.dashboard import STATIC, dashboardResource


def get(root, path: bytes) -> DummyRequest:
    """Render C{GET path} on C{root}, returning the finished request."""
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.uri = path
    resource = getChildForRequest(root, request)
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
        request.finish()
    return request


class DashboardResourceTests(SynchronousTestCase):
    def test_pageAtRoot(self):
        request = get(dashboardResource(), b"/")
        self.assertEqual(request.responseCode or 200, 200)
        self.assertEqual(b"".join(request.written), (STATIC / "index.html").read_bytes())
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])

    def test_assetsWithTheirTypes(self):
        for path, contentType in [(b"/app.js", b"text/javascript; charset=utf-8"),
                                  (b"/style.css", b"text/css; charset=utf-8")]:
            request = get(dashboardResource(), path)
            self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [contentType])
            self.assertEqual(request.responseHeaders.getRawHeaders(b"x-content-type-options"),
                             [b"nosniff"])
            self.assertIn(b"default-src 'self'",
                          request.responseHeaders.getRawHeaders(b"content-security-policy")[0])

    def test_nothingElse(self):
        for path in [b"/static", b"/dashboard.py", b"/../setup.cfg", b"/app.js/x", b"/nope"]:
            request = get(dashboardResource(), path)
            self.assertEqual(request.responseCode, 404, path)

    def test_apiMountsBeside(self):
        """The admin site mounts its API on the dashboard's root, and that wins over 404."""
        root = dashboardResource()
        api = dashboardResource()
        root.putChild(b"api", api)
        request = get(root, b"/api/app.js")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"text/javascript; charset=utf-8"])

    def test_pageUsesOnlyItsOwnAssets(self):
        """No CDN, no external URL: the page runs from what this program serves."""
        for name in ["index.html", "app.js", "style.css"]:
            text = (STATIC / name).read_text()
            self.assertNotIn("http://", text, name)
            self.assertNotIn("https://", text, name)
            self.assertNotIn("//cdn", text, name)
