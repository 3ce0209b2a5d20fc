"""
Log messages in Chinese: the catalogue covers every message, its compiled
form matches its source, and the observer and error lines use it.
"""

import ast
import gettext
import re
from pathlib import Path

from twisted.logger import formatEvent
from twisted.trial import unittest

import gotunnel
from gotunnel.i18n import LOCALE_DIR, TranslatingObserver, translation
from gotunnel.report import AUTHENTICATION_FAILED, SERVER_UNREACHABLE, formatError

PO_FILE = LOCALE_DIR / "zh" / "LC_MESSAGES" / "gotunnel.po"
LOG_METHODS = {"debug", "info", "warn", "error", "critical", "failure"}


def readPo(path: Path) -> dict[str, str]:
    """The msgid -> msgstr pairs of a .po file (single-line entries)."""
    entries = {}
    msgid = None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r'^(msgid|msgstr) "(.*)"$', line)
        if not match:
            continue
        text = match.group(2).encode("raw_unicode_escape").decode("unicode_escape")
        if match.group(1) == "msgid":
            msgid = text
        elif msgid:
            entries[msgid] = text
    return entries


def logFormat(node: ast.AST):
    """
    The literal format string of a Logger call (C{log.info("...")}, or
    C{log.emit(level, "...")}), or None.
    """
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    if node.func.attr in LOG_METHODS:
        position = 0
    elif node.func.attr == "emit":
        position = 1
    else:
        return None
    if len(node.args) > position:
        argument = node.args[position]
    else:
        argument = next((k.value for k in node.keywords if k.arg == "format"), None)
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return argument.value
    return None


def logFormats() -> set[str]:
    """Every literal format string passed to a Logger method in gotunnel/ and its subpackages."""
    formats = set()
    for path in Path(gotunnel.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            fmt = logFormat(node)
            if fmt is not None:
                formats.add(fmt)
    return formats - {"{line}"}


class CatalogueTests(unittest.TestCase):
    def test_scanFindsEveryLogCall(self):
        """The scan reads subpackages, and emit()'s format, its second argument."""
        formats = logFormats()
        self.assertIn("admin endpoint: a login from {host}", formats)
        self.assertTrue(any(f.startswith("connection {conn} from {user} to {client} port")
                            for f in formats))

    def test_everyLogMessageTranslated(self):
        """Each format string the code logs has a Chinese entry."""
        missing = logFormats() - set(readPo(PO_FILE))
        self.assertEqual(missing, set())

    def test_compiledCatalogueMatchesSource(self):
        """gotunnel.mo says what gotunnel.po says (run msgfmt after editing it)."""
        zh = translation("zh")
        for msgid, msgstr in readPo(PO_FILE).items():
            self.assertEqual(zh.gettext(msgid), msgstr, msgid)

    def test_placeholdersKept(self):
        """A translation names the same fields as its message."""
        fields = re.compile(r"\{[^}]*\}")
        for msgid, msgstr in readPo(PO_FILE).items():
            self.assertEqual(sorted(fields.findall(msgid)), sorted(fields.findall(msgstr)), msgid)

    def test_unknownLanguage(self):
        self.assertRaises(ValueError, translation, "fr")

    def test_english(self):
        self.assertIsInstance(translation("en"), gettext.NullTranslations)


class ObserverTests(unittest.TestCase):
    def test_translatesFormat(self):
        """Events reach the output with their format in Chinese, fields intact."""
        seen = []
        observer = TranslatingObserver(seen.append, "zh")
        observer({"log_format": "public port {remote_port} stopped", "remote_port": 10022})
        self.assertEqual(formatEvent(seen[0]), "公网端口 10022 监听关闭")

    def test_untranslatedPassesThrough(self):
        """An event we have no translation for is passed on unchanged."""
        seen = []
        event = {"log_format": "something from Twisted {x}", "x": 1}
        TranslatingObserver(seen.append, "zh")(event)
        self.assertIs(seen[0], event)

    def test_englishUnchanged(self):
        seen = []
        TranslatingObserver(seen.append, "en")({"log_format": "public port {remote_port} stopped",
                                                "remote_port": 1})
        self.assertEqual(formatEvent(seen[0]), "public port 1 stopped")


class ErrorLineTests(unittest.TestCase):
    def test_goWordingEnglish(self):
        self.assertEqual(formatError(AUTHENTICATION_FAILED),
                         "[ERROR][1002] Authentication failed, please check token")
        self.assertEqual(formatError(SERVER_UNREACHABLE, "Connection refused"),
                         "[ERROR][1001] Failed to connect to server: Connection refused")

    def test_goWordingChinese(self):
        """The same codes, in the Go gotunnel's Chinese wording."""
        self.assertEqual(formatError(AUTHENTICATION_FAILED, lang="zh"),
                         "[ERROR][1002] 认证失败，请检查token")
        self.assertEqual(formatError(SERVER_UNREACHABLE, "Connection refused", lang="zh"),
                         "[ERROR][1001] 无法连接服务端: Connection refused")
