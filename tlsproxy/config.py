"""
C{--config FILE}: an INI file, a service per section, named by it; keys are
long options (a repeatable one a value per line, a flag yes/no), C{[DEFAULT]}
for every section.  Each section is read as a command line.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

from twisted.python import usage

from .values import ConfigError

OptionsT = TypeVar("OptionsT")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def read_services(
    path: str,
    parse: Callable[[list[str]], OptionsT],
    kinds: Mapping[str, str],
    process_wide: Collection[str],
) -> list[tuple[str, OptionsT]]:
    """
    Each section of C{path}: its name, and C{parse}'s reading of it as the
    command line C{kinds} says; C{process_wide} keys refused; ConfigError.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except (configparser.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: {' '.join(str(e).split())}") from None
    if not parser.sections():
        raise ConfigError(f"--config {path}: no service (a section such as [https])")
    _argv(f"{path} [DEFAULT]", parser.defaults(), kinds, process_wide)
    services: list[tuple[str, OptionsT]] = []
    for name in parser.sections():
        where = f"{path} [{name}]"
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: a name of letters, digits, '.', '_', '-'")
        try:
            parsed = parse(_argv(where, parser[name], kinds, process_wide))
        except usage.UsageError as e:
            raise ConfigError(f"{where} {e}") from None
        services.append((name, parsed))
    return services


def _argv(
    where: str,
    section: Mapping[str, str],
    kinds: Mapping[str, str],
    process_wide: Collection[str],
) -> list[str]:
    """The command line that says what C{section} says."""
    argv = []
    for key, value in section.items():
        if key in process_wide:
            raise ConfigError(f"{where} {key}: process-wide: give --{key} instead")
        kind = kinds.get(key)
        if kind is None:
            raise ConfigError(f"{where} {key}: unknown key")
        lines = [line for line in value.split("\n") if line] or [value]
        if kind == "flag":
            argv += [f"--{key}"] if _yes(f"{where} {key}", value) else []
        elif len(lines) > 1 and kind == "value":
            raise ConfigError(f"{where} {key}: one value only, not {len(lines)}")
        else:
            argv += [f"--{key}={line}" for line in lines]
    return argv


def _yes(where: str, value: str) -> bool:
    states = configparser.ConfigParser.BOOLEAN_STATES
    if value.lower() not in states:
        raise ConfigError(f"{where}: {value}: not yes/no, true/false, on/off or 1/0")
    return states[value.lower()]
