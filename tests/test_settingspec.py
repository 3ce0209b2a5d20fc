"""
Settings declared once: the config file's keys and the command-line options
made from the declarations on the settings fields, and docs/configuration.md's
tables checked against them, key by key, option by option, default by default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from twisted.trial import unittest

from gotunnel.config import mappings, yamlfile
from gotunnel.config.settings import ClientPolicy, ClientSettings, ServerSettings
from gotunnel.config.kinds import FLAG, SECONDS
from gotunnel.config.spec import commandLine, declared, keysOf, setting, yamlKeys
from gotunnel.cli.tap import ClientOptions, ServerOptions

CONFIGURATION = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "configuration.md")


def documentedTable(heading: str) -> list[list[str]]:
    """The cells of each row of the first table after C{heading}, header left out."""
    with open(CONFIGURATION, encoding="utf-8") as f:
        section = f.read().split(f"\n{heading}\n", 1)[1]
    lines = section[section.index("\n|"):].strip().splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def quoted(cell: str) -> list[str]:
    """The `quoted` names of a cell, in order."""
    return re.findall(r"`([^`]*)`", cell)


def shownDefault(value: Any) -> str:
    """A default as the tables write it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


class DeclarationTests(unittest.TestCase):
    """What the declarations on the fields make."""

    def test_keysKeepTheirSpellings(self):
        """The Go keys and ours, aliases included, each read by its field's declaration."""
        self.assertIn("addr", yamlfile._SERVER_KEYS)
        self.assertIn("server_addr", yamlfile._CLIENT_KEYS)
        self.assertEqual(set(yamlKeys(ClientPolicy)), {
            "token", "allow_ports", "max_mappings", "domains", "allow_sources",
            "deny_sources", "max_users_per_port", "max_connection_rate", "bandwidth_limit"})

    def test_aNewSettingIsWrittenOnce(self):
        """One declared field is a config key, an option and a line of --help."""

        @dataclasses.dataclass
        class Settings:
            answer_timeout: float = setting(5.0, SECONDS, option="answer-timeout",
                                            help="Seconds to wait for an answer")
            quiet: bool = setting(False, FLAG, option="quiet", help="Say less")
            internal: int = 3

        self.assertEqual(list(yamlKeys(Settings)), ["answer_timeout", "quiet"])
        options = commandLine(Settings, "server")
        [parameter] = options.parameters
        self.assertEqual(parameter[:4], ["answer-timeout", None, None,
                                         "Seconds to wait for an answer "
                                         "(default: 5; server.answer_timeout)."])
        self.assertEqual(parameter[4]("2.5"), 2.5)
        self.assertEqual(parameter[4].coerceDoc, "Seconds, greater than 0.")
        self.assertRaises(ValueError, parameter[4], "0")
        self.assertEqual(options.flags, [["quiet", None, "Say less (server.quiet: true)."]])
        self.assertEqual(options.fields, {"answer-timeout": "answer_timeout"})
        self.assertEqual(options.flagValues, {"quiet": ("quiet", True)})

    def test_optionsFromTheDeclarations(self):
        """Each declared option of a role's Options sets its field, from the command line."""
        options = ServerOptions()
        options.parseOptions(["--token", "t", "--data-timeout", "7", "--no-mux",
                              "--no-zero-copy", "--busy-poll", "0"])
        settings = options.settings()
        self.assertEqual((settings.data_channel_timeout, settings.mux, settings.zero_copy,
                          settings.busy_poll), (7.0, False, False, 0))
        options = ClientOptions()
        options.parseOptions(["--token", "t", "--map", "22:10022", "--tls", "--mux",
                              "--exit-on-refusal", "-n", "office", "--pool-count", "0"])
        settings = options.settings()
        self.assertEqual((settings.tls, settings.mux, settings.exit_on_refusal,
                          settings.name, settings.pool_count), (True, True, True, "office", 0))


class DocumentedTablesTests(unittest.TestCase):
    """docs/configuration.md's tables name every setting, and only settings."""

    def assertTableMatches(self, heading: str, settingsType: type, optionsType: type) -> None:
        rows = documentedTable(heading)
        role = heading.strip("#: ")
        declarations = {f.name: (f, declaration) for f, declaration in declared(settingsType)}
        keys = yamlKeys(settingsType)
        known = optionsType()
        options = {name.rstrip("=") for name in known.longOpt} | set(known.synonyms)
        documentedKeys, documentedOptions = set(), set()
        for row in rows:
            keyCell, optionCell, defaultCell = row[0], row[1], row[2]
            for name in quoted(keyCell):
                key, _, sub = name.partition("[].")
                self.assertIn(key, keys, f"{heading}: {name!r} is not a {role}: key")
                if sub:
                    self.assertIn(sub.split(":")[0], mappings._TUNNEL_KEYS, name)
                else:
                    documentedKeys.add(key)
            named = {word.lstrip("-") for word in re.findall(r"`(-[-\w]+)", optionCell)}
            for option in named:
                self.assertIn(option, options, f"{heading}: {keyCell}: no option --{option}")
            documentedOptions |= named
            [name] = quoted(keyCell)[:1]
            if name in declarations:
                f, declaration = declarations[name]
                if declaration.option:
                    self.assertIn(declaration.option, named, f"{heading}: {name}")
                if declaration.short:
                    self.assertIn(declaration.short, named, f"{heading}: {name}")
                if defaultCell.startswith("`") and f.default is not dataclasses.MISSING:
                    self.assertEqual(quoted(defaultCell)[0], shownDefault(f.default),
                                     f"{heading}: the default of {name}")
        self.assertEqual(set(keys) - documentedKeys, set(),
                         f"{heading}: keys missing from docs/configuration.md")
        declaredOptions = {declaration.option for _, declaration in declarations.values()
                           if declaration.option}
        self.assertEqual(declaredOptions - documentedOptions, set(),
                         f"{heading}: options missing from docs/configuration.md")

    def test_server(self):
        self.assertTableMatches("## server:", ServerSettings, ServerOptions)

    def test_client(self):
        self.assertTableMatches("## client:", ClientSettings, ClientOptions)

    def test_clients(self):
        """The table of a listed client's keys (server.clients.NAME)."""
        documented = {name for row in documentedTable("## Clients")
                      for name in quoted(row[0])}
        self.assertEqual(documented, set(yamlKeys(ClientPolicy)))

    def test_everyKeyHasItsKind(self):
        """A declared key reads its values: no declaration without a reader."""
        for settingsType in (ServerSettings, ClientSettings, ClientPolicy):
            for f, declaration in declared(settingsType):
                self.assertTrue(keysOf(f, declaration), f"{settingsType.__name__}.{f.name}")
