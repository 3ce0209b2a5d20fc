"""
Each setting of L{gotunnel.config.settings.ServerSettings} and
L{gotunnel.config.settings.ClientSettings} is declared once, as its field's metadata
(L{setting}): its config.yaml key and the Go spellings that also set it, how
a value is read and checked (a L{Kind}), its command-line option and help.
The config file's key tables (L{yamlKeys}) and the usage.Options parameters
and flags (L{commandLine}) are made from the declarations, and
tests/test_settingspec.py checks docs/configuration.md's tables against them.

So a new setting is one field, C{name: float = setting(5.0, SECONDS,
option="name", help="...")}, and its row in docs/configuration.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, NamedTuple, Optional

_METADATA = "gotunnel.setting"


@dataclass(frozen=True)
class Kind:
    """How one kind of value (seconds, a port, a flag ...) is read and checked."""

    read: Callable[[Any, Any, str], Any]
    """(the YAML value, the text it was written as, the key's name) -> the value,
    or ValueError naming the key."""
    coerce: Optional[Callable[[str, str], Any]] = None
    """(an option's text, --option) -> the value, or ValueError; None: the text
    as it is."""
    coerceDoc: str = ""
    """What --help adds after the option's own line."""
    flag: bool = False
    """A true-or-false value: on the command line, a flag rather than a parameter."""


@dataclass(frozen=True)
class Setting:
    """A settings field's declaration: see L{setting}."""

    kind: Optional[Kind]
    key: bool
    aliases: dict[str, Kind]
    option: Optional[str]
    short: Optional[str]
    help: str
    shown: Optional[str]


def setting(default: Any = MISSING, kind: Optional[Kind] = None, *,
            option: Optional[str] = None, short: Optional[str] = None, help: str = "",
            shown: Optional[str] = None, key: bool = True,
            aliases: Optional[dict[str, Kind]] = None,
            default_factory: Any = MISSING, repr: bool = True) -> Any:
    """
    A settings field declared with what reads it:

      - C{kind} reads the config.yaml key named as the field (none with
        C{key=False}); C{aliases} are other keys (the Go programs' spellings)
        that set the same field, each read by its own kind;
      - C{option} is its command-line option (C{short} a one-letter
        synonym): a parameter coerced by C{kind}, or, for a kind that is a
        flag, an option that sets the opposite of C{default};
      - C{help} is the option's line in --help, which goes on with the default
        (or C{shown} instead, e.g. "required") and the config file's key.
    """
    return field(default=default, default_factory=default_factory, repr=repr,
                 metadata={_METADATA: Setting(kind, key, dict(aliases or {}), option, short,
                                              help, shown)})


def declared(settingsType: type) -> list[tuple[dataclasses.Field, Setting]]:
    """The fields of C{settingsType} declared with L{setting}, in their order."""
    return [(f, f.metadata[_METADATA]) for f in dataclasses.fields(settingsType)
            if _METADATA in f.metadata]


def keysOf(f: dataclasses.Field, declaration: Setting) -> dict[str, Kind]:
    """The config.yaml keys that set field C{f}, each with the kind that reads it."""
    own = {f.name: declaration.kind} if declaration.key and declaration.kind else {}
    return {**own, **declaration.aliases}


def readEntry(entry: dict, texts: Any, keys: dict[str, Callable[[Any, Any, str], Any]],
              where: str) -> dict[str, Any]:
    """
    The values of one entry of a config file's list or table (a client of
    server.clients, a tunnel of client.tunnels), each read by its key's
    reader in C{keys}; a key left empty is left out.  ValueError for a key
    that is not in C{keys}.
    """
    texts = texts if isinstance(texts, dict) else {}
    values = {}
    for key, item in entry.items():
        if key not in keys:
            raise ValueError(f"{where}.{key} is not a known key "
                             f"(expected {', '.join(keys)})")
        if item is not None:
            values[key] = keys[key](item, texts.get(key), f"{where}.{key}")
    return values


def yamlKeys(settingsType: type) -> dict[str, Callable[[Any, Any, str], Any]]:
    """Every config.yaml key of C{settingsType}'s section -> its reader."""
    return {key: kind.read for f, declaration in declared(settingsType)
            for key, kind in keysOf(f, declaration).items()}


class CommandLine(NamedTuple):
    """The options of one role, for a usage.Options subclass."""

    parameters: list[list[Any]]
    """optParameters entries: [option, short, None, help, coerce]."""
    flags: list[list[Any]]
    """optFlags entries: [option, short, help]."""
    fields: dict[str, str]
    """Parameter -> the settings field it sets to its value."""
    flagValues: dict[str, tuple[str, Any]]
    """Flag -> (the settings field it sets, the value it sets)."""


def _shownDefault(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def coercer(kind: Kind, option: str) -> Callable[[str], Any]:
    """C{kind}'s coerce for --C{option}, as usage.Options calls it."""

    def coerce(text: str) -> Any:
        return kind.coerce(text, f"--{option}")

    coerce.coerceDoc = kind.coerceDoc  # type: ignore[attr-defined]
    return coerce


def commandLine(settingsType: type, role: str) -> CommandLine:
    """The command-line options of C{settingsType}'s declared fields that have one."""
    parameters, flags, fields, flagValues = [], [], {}, {}
    for f, declaration in declared(settingsType):
        option = declaration.option
        if option is None:
            continue
        keys = " or ".join(f"{role}.{key}" for key in keysOf(f, declaration))
        if declaration.kind is not None and declaration.kind.flag:
            value = not f.default
            flags.append([option, declaration.short,
                          f"{declaration.help} ({keys}: {str(value).lower()})."])
            flagValues[option] = (f.name, value)
            continue
        shown = declaration.shown
        if shown is None and f.default not in (MISSING, ""):
            shown = f"default: {_shownDefault(f.default)}"
        where = f"{shown}; {keys}" if shown else keys
        entry = [option, declaration.short, None, f"{declaration.help} ({where})."]
        if declaration.kind is not None and declaration.kind.coerce is not None:
            entry.append(coercer(declaration.kind, option))
        parameters.append(entry)
        fields[option] = f.name
    return CommandLine(parameters, flags, fields, flagValues)
