"""
The dashboard in a real browser: headless Chromium, driven by selenium
through Debian's chromedriver (nothing downloads a driver), against a real
server with its admin endpoint, a real client and a real local service, all
on 127.0.0.1 in this process.  The operator logs in, sees a client and its
port appear, watches the bytes of a live transfer grow, and disconnects the
client from the page; closes a live connection, takes a port offline and
online again, and is sent back to the login form when its session ends.

Selenium's calls block, so every browser step runs in a thread
(L{threads.deferToThread}) while the reactor serves the page, the API and
the tunnel.  Every wait is on the page's DOM or on an event, bounded; nothing
sleeps.  The run saves a screenshot in a temporary directory, and also in
C{$GOTUNNEL_SCREENSHOT_DIR} when it is set (C{GOTUNNEL_SCREENSHOT_DIR=docs}
refreshes docs/dashboard.png).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet import defer, task, threads
from twisted.trial import unittest

from tests.support import (
    HOST, Tunnel, connectUser, listenTarget, waitUntil, waitUntilRefused, within,
)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ADMIN_TOKEN = "admin-test-token"
WAIT = 30
"""Seconds any one step may take, in the browser or the tunnel, on a loaded machine."""

CHROMIUM_ARGUMENTS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--window-size=1280,820",
]


def startBrowser(profile: str) -> webdriver.Chrome:
    """Headless Chromium with a profile of its own in C{profile} (blocks: run in a thread)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class PacedStream:
    """
    A bounded, slow-ish transfer: C{chunk} bytes every C{interval} seconds
    written to C{transport}, at most C{limit} bytes in all, until L{stop}.
    """

    def __init__(self, transport, chunk: int = 16 * 1024, interval: float = 0.02,
                 limit: int = 64 * 1024 * 1024) -> None:
        self.transport = transport
        self.chunk = b"x" * chunk
        self.limit = limit
        self.sent = 0
        self.call = task.LoopingCall(self._write)
        self.interval = interval

    def start(self) -> None:
        self.call.start(self.interval)

    def _write(self) -> None:
        if self.sent >= self.limit or self.transport.disconnecting:
            self.stop()
            return
        self.transport.write(self.chunk)
        self.sent += len(self.chunk)

    def stop(self) -> None:
        if self.call.running:
            self.call.stop()


ROW_VALUES = """
const row = document.querySelector(arguments[0]);
if (!row) return null;
const values = {};
for (const cell of row.querySelectorAll("td[data-field]")) {
  const value = cell.dataset.value;
  values[cell.dataset.field] = value !== undefined ? value : cell.textContent;
}
values.key = row.dataset.key;
return values;
"""
"""The cells of the row C{arguments[0]} selects, read at one instant (or null)."""


class DashboardPage:
    """The dashboard as the operator sees it; every method blocks (run it in a thread)."""

    def __init__(self, browser: webdriver.Chrome, url: str) -> None:
        self.browser = browser
        self.url = url

    def wait(self, condition: Callable, what: str, timeout: float = WAIT):
        return WebDriverWait(self.browser, timeout, poll_frequency=0.1).until(
            lambda browser: condition(), f"{what}: not on the page within {timeout} s")

    def row(self, selector: str) -> Optional[dict]:
        return self.browser.execute_script(ROW_VALUES, selector)

    def logIn(self, token: str) -> None:
        self.browser.get(self.url)
        self.wait(lambda: self.browser.find_element(By.ID, "login-token").is_displayed(),
                  "the login form")
        self.browser.find_element(By.ID, "login-token").send_keys(token)
        self.browser.find_element(By.ID, "login-submit").click()
        self.wait(lambda: self.browser.find_element(By.ID, "dashboard").is_displayed(),
                  "the dashboard after logging in")
        self.wait(lambda: self.browser.find_element(By.ID, "status")
                  .get_attribute("data-state") == "live", "the first poll of the overview")

    def client(self, name: str) -> dict:
        """Waits for the client called C{name}; returns its row, with its id as C{key}."""
        return self.wait(lambda: self.row(f'#clients tr[data-client-name="{name}"]'),
                         f"client {name}")

    def port(self, remotePort: int, state: str) -> dict:
        return self.wait(lambda: (lambda row: row if row and row["state"] == state else None)(
            self.row(f'#ports tr[data-port="{remotePort}"]')), f"port {remotePort} {state}")

    def connection(self, remotePort: int) -> dict:
        return self.wait(lambda: self.row(f'#connections tr[data-port="{remotePort}"]'),
                         f"a live connection on port {remotePort}")

    def bytesGrow(self, selector: str, what: str, past: int, flowing: bool = False) -> dict:
        """
        Waits until the row's bytes in and out add up to more than C{past}
        (and, if C{flowing}, until it shows a byte rate above zero).
        """

        def grown():
            row = self.row(selector)
            if not row or int(row["bytes_in"]) + int(row["bytes_out"]) <= past:
                return None
            if flowing and float(row["rate_in"] or 0) + float(row["rate_out"] or 0) <= 0:
                return None
            return row

        return self.wait(grown, f"the bytes of {what} growing past {past}"
                                + (", at a rate above zero" if flowing else ""))

    def click(self, row: str, action: str) -> None:
        """Click the C{action} button of the row C{row} selects."""
        self.browser.find_element(By.CSS_SELECTOR, f'{row} button[data-action="{action}"]').click()

    def sessionEnds(self) -> None:
        """The server no longer knows the page's session: the page goes back to the login form."""
        self.browser.execute_script("sessionStorage.setItem('gotunnel.session', 'forgotten')")
        self.wait(lambda: self.browser.find_element(By.ID, "login").is_displayed()
                  and "session" in self.browser.find_element(By.ID, "login-error").text,
                  "the login form, saying the session ended")

    def gone(self, selector: str, what: str) -> None:
        self.wait(lambda: self.row(selector) is None, f"{what} gone")

    def screenshot(self, directory: str, name: str) -> str:
        path = os.path.join(directory, name)
        self.browser.save_screenshot(path)
        return path


class DashboardBrowserTests(unittest.TestCase):
    timeout = 240

    @pytest.fixture(autouse=True)
    def _screenshots(self, tmp_path):
        """pytest's temporary directory for this test's screenshots."""
        self.screenshots = str(tmp_path)

    def setUp(self):
        if not os.access(CHROMIUM, os.X_OK) or not os.access(CHROMEDRIVER, os.X_OK):
            self.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: "
                      "apt-get install chromium chromium-driver (.ci/run does)")
        if not getattr(self, "screenshots", None):
            self.screenshots = tempfile.mkdtemp(prefix="gotunnel-screenshots-")

    @defer.inlineCallbacks
    def startBrowser(self):
        profile = tempfile.mkdtemp(prefix="gotunnel-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        browser = yield within(threads.deferToThread(startBrowser, profile), 60,
                               "headless Chromium to start")
        self.addCleanup(threads.deferToThread, browser.quit)
        return browser

    def inBrowser(self, page: DashboardPage, step: Callable, *args) -> defer.Deferred:
        """Run C{step(*args)} in a thread; if it times out, keep a screenshot of the page."""

        def failed(failure):
            if failure.check(TimeoutException):
                path = os.path.join(self.screenshots, "failure.png")
                try:
                    page.browser.save_screenshot(path)
                except Exception:
                    return failure
                self.fail(f"{failure.getErrorMessage()} (the page then: {path})")
            return failure

        return threads.deferToThread(step, *args).addErrback(failed)

    @defer.inlineCallbacks
    def openDashboard(self, **serverSettings):
        """A server with its admin endpoint, and the browser logged in to its dashboard."""
        tunnel = Tunnel(self)
        server = yield tunnel.startServer(admin=f"tcp:0:interface={HOST}",
                                          admin_token=ADMIN_TOKEN, **serverSettings)
        adminPort = (yield within(server.admin.whenListening(), WAIT,
                                  "the admin endpoint")).getHost().port
        browser = yield self.startBrowser()
        page = DashboardPage(browser, f"http://{HOST}:{adminPort}/")
        yield self.inBrowser(page, page.logIn, ADMIN_TOKEN)
        return tunnel, page

    @defer.inlineCallbacks
    def test_operatorWatchesAndDisconnects(self):
        """
        Log in; a client and its port appear when the client connects; the
        bytes of a live transfer grow on the page; the Disconnect button
        drops the client's control channel and its row goes away.
        """
        tunnel, page = yield self.openDashboard()

        target = listenTarget(self)
        client, remotePort = yield tunnel.publish(target, name="laptop")
        channel = yield client.tunnels[0].whenRegistered()
        clientRow = yield self.inBrowser(page, page.client, "laptop")
        self.assertEqual(clientRow["mappings"], f"{remotePort} → {target}")
        portRow = yield self.inBrowser(page, page.port, remotePort, "online")
        self.assertEqual(portRow["local_port"], str(target))

        user = yield within(connectUser(self, remotePort), WAIT, "a user of the public port")
        stream = PacedStream(user.transport)
        stream.start()
        self.addCleanup(stream.stop)
        connection = yield self.inBrowser(page, page.connection, remotePort)
        connSelector = f'#connections tr[data-key="{connection["key"]}"]'
        portSelector = f'#ports tr[data-port="{remotePort}"]'
        first = yield self.inBrowser(page, page.bytesGrow, connSelector, "the live connection", 0)
        seen = int(first["bytes_in"]) + int(first["bytes_out"])
        yield self.inBrowser(page, page.bytesGrow, connSelector, "the live connection",
                             seen + 256 * 1024, True)
        portNow = yield self.inBrowser(page, page.row, portSelector)
        yield self.inBrowser(page, page.bytesGrow, portSelector, f"port {remotePort}",
                             int(portNow["bytes_in"]) + int(portNow["bytes_out"]))
        yield within(user.whenReceived(1), WAIT, "the transfer's echo, back through the tunnel")

        shot = yield threads.deferToThread(page.screenshot, self.screenshots, "dashboard.png")
        keep = os.environ.get("GOTUNNEL_SCREENSHOT_DIR")
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(shot, os.path.join(keep, "dashboard.png"))

        clientSelector = f'#clients tr[data-key="{clientRow["key"]}"]'
        yield self.inBrowser(page, page.click, clientSelector, "disconnect")
        yield self.inBrowser(page, page.gone, clientSelector, f"client {clientRow['key']}")
        yield waitUntil(lambda: client.tunnels[0].channel is not channel, WAIT,
                        "the server to drop the disconnected client's control channel")
        stream.stop()

    @defer.inlineCallbacks
    def test_operatorClosesAConnectionAndTakesThePortOffline(self):
        """
        The Close button ends a live connection; Take offline stops the
        public port listening and Bring online starts it again; a client
        that goes leaves its port leased, with no action; a session
        the server no longer accepts sends the page back to the login form.
        """
        tunnel, page = yield self.openDashboard()
        target = listenTarget(self)
        client, remotePort = yield tunnel.publish(target, name="office-pc")
        portSelector = f'#ports tr[data-port="{remotePort}"]'
        yield self.inBrowser(page, page.port, remotePort, "online")

        user = yield within(connectUser(self, remotePort), WAIT, "a user of the public port")
        user.transport.write(b"hello")
        yield within(user.whenReceived(5), WAIT, "the echo through the tunnel")
        connection = yield self.inBrowser(page, page.connection, remotePort)
        connSelector = f'#connections tr[data-key="{connection["key"]}"]'
        yield self.inBrowser(page, page.click, connSelector, "close")
        yield within(user.closed, WAIT, "the user's connection, closed from the page")
        yield self.inBrowser(page, page.gone, connSelector, f"connection {connection['key']}")

        yield self.inBrowser(page, page.click, portSelector, "offline")
        yield self.inBrowser(page, page.port, remotePort, "offline")
        yield waitUntilRefused(remotePort, WAIT, f"port {remotePort} to stop listening")
        yield self.inBrowser(page, page.click, portSelector, "online")
        yield self.inBrowser(page, page.port, remotePort, "online")
        again = yield within(connectUser(self, remotePort), WAIT, "a user, the port online again")
        again.transport.write(b"again")
        yield within(again.whenReceived(5), WAIT, "the echo through the port, online again")

        yield client.stopService()
        leased = yield self.inBrowser(page, page.port, remotePort, "leased")
        self.assertEqual((leased["client"], leased["local_port"]), ("office-pc", "–"))
        stateAndButtons = yield self.inBrowser(page, page.browser.execute_script, (
            "const row = document.querySelector(arguments[0]);"
            "return row && [row.dataset.state, row.querySelectorAll('button').length];"),
            portSelector)
        self.assertEqual(stateAndButtons, ["leased", 0])

        yield self.inBrowser(page, page.sessionEnds)

    @defer.inlineCallbacks
    def test_virtualHostsEachTheirRow(self):
        """
        Two virtual hosts of one client (both port 0) are two rows, named by
        scheme and domains; Take offline acts on its own row's virtual host.
        """
        from tests.test_vhost import VirtualHostFixture, http

        tunnel, page = yield self.openDashboard(vhost_http=f"tcp:0:interface={HOST}")
        fixture = VirtualHostFixture(self)
        fixture.tunnel, fixture.server = tunnel, tunnel.server
        target = listenTarget(self)
        yield fixture.publish([http(target, ["a.example.com"]),
                               http(target, ["b.example.com", "c.example.com"])], name="web")
        names = yield self.inBrowser(page, page.wait, lambda: (lambda names: names
                                     if len(names) == 2 else None)(page.browser.execute_script(
                                         "return Array.from(document.querySelectorAll("
                                         "'#ports tr[data-port=\"0\"] td[data-field=\"remote_port\"]'"
                                         "), (cell) => cell.textContent).sort()")),
                                     "two virtual-host rows")
        self.assertEqual(names, ["http://a.example.com", "http://b.example.com,c.example.com"])
        row = '#ports tr[data-key="http://b.example.com,c.example.com"]'
        yield self.inBrowser(page, page.click, row, "offline")
        yield self.inBrowser(page, page.wait, lambda: (page.row(row) or {}).get("state")
                             == "offline", "the virtual host offline")
        states = {tunnel.domains: tunnel.online
                  for tunnel in fixture.server.registry.tunnels.values()}
        self.assertEqual(states, {("a.example.com",): True,
                                  ("b.example.com", "c.example.com"): False})
