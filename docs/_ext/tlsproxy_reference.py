"""
The reference of tlsproxy(8) and tlsproxy.conf(5), made from the code.

What each option is (its name, whether it takes an argument, its default,
its C{--help} text, whether it is repeatable or process-wide) is read from
L{tlsproxy.tap.Options}; what each connection-log field is (its name, its JSON
type) from L{tlsproxy.record.ConnectionRecord}.  Only the longer explanations
are written by hand, one entry per option in C{docs/_entries/options.rst} and
one per field (or group of fields) in C{docs/_entries/fields.rst}.  An option
or a field without an entry, an entry for none, or an entry that disagrees with
the code is a warning, which fails the build (C{sphinx-build -W}), and
C{tests/test_docs.py} checks the same with L{problems}.

Three directives, each without arguments or content::

    .. tlsproxy-options::       every option, as on the command line
    .. tlsproxy-config-keys::   every key of a --config file
    .. tlsproxy-fields::        every field of a connection record
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

from tlsproxy.record import ConnectionRecord
from tlsproxy.tap import KINDS, PROCESS_WIDE, REPEATABLE, Options

ENTRIES = Path(__file__).resolve().parent.parent / "_entries"
OPTION_ENTRIES = ENTRIES / "options.rst"
FIELD_ENTRIES = ENTRIES / "fields.rst"

_INLINE = 40
"""A longer default (the ciphers') is shown as a literal block."""

TWISTED_OWN = frozenset({"help", "version"})
"""Options that every C{usage.Options} has: twistd's, not tlsproxy's."""

_log = logging.getLogger(__name__)


@attrs.frozen
class Option:
    """One option of C{twistd tlsproxy}, as the code has it."""

    name: str
    takes_argument: bool
    default: str | None
    help: str
    repeatable: bool
    process_wide: bool


@attrs.frozen
class Entry:
    """A hand-written entry: the names it documents, an argument, its text."""

    names: tuple[str, ...]
    argument: str
    text: tuple[str, ...]
    source: str
    line: int


def options(options_class: type[Options] = Options) -> dict[str, Option]:
    """Every option of C{options_class} but twistd's own, by name."""
    made = options_class()
    found = {}
    for spelled in made.longOpt:
        name = spelled.rstrip("=")
        if name in TWISTED_OWN:
            continue
        default = made.defaults.get(name)
        found[name] = Option(
            name=name,
            takes_argument=spelled.endswith("="),
            default=default if isinstance(default, str) and default else None,
            help=made.docs.get(name) or "",
            repeatable=name in REPEATABLE,
            process_wide=name in PROCESS_WIDE,
        )
    return found


def json_type(annotation: Any) -> str:
    """The JSON type of a record field annotated C{annotation}."""
    names = {"str": "string", "int": "integer", "float": "number", "None": "null"}
    parts = [part.strip() for part in str(annotation).split("|")]
    return " or ".join(names[part] for part in parts)


def fields(record_class: type[Any] = ConnectionRecord) -> dict[str, str]:
    """Every field of C{record_class}, in order, with its JSON type."""
    return {field.name: json_type(field.type) for field in attrs.fields(record_class)}


def read_entries(path: Path) -> list[Entry]:
    """
    The entries of C{path}: a line at the left margin names an entry (an
    option and its argument, C{--cert FILE}, or fields, C{client_host,
    client_port}); the indented lines below it are its text.  A comment
    (C{..} at the margin, and what is indented below it) is skipped.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    heads = [n for n, line in enumerate(lines) if line and not line[0].isspace()]
    entries = []
    for start, stop in zip(heads, [*heads[1:], len(lines)], strict=True):
        head = lines[start]
        if head.startswith(".."):
            continue
        if head.startswith("--"):  # --cert FILE
            names = tuple(re.findall(r"--([\w-]+)", head))
            argument = re.sub(r"--[\w-]+,?", "", head).strip()
        else:  # client_host, client_port
            names = tuple(name.strip() for name in head.split(","))
            argument = ""
        text = textwrap.dedent("\n".join(lines[start + 1 : stop])).strip()
        entries.append(
            Entry(names, argument, tuple(text.splitlines()), str(path), start + 1)
        )
    return entries


def problems(
    known_options: dict[str, Option],
    known_fields: dict[str, str],
    option_entries: Sequence[Entry],
    field_entries: Sequence[Entry],
) -> list[str]:
    """What disagrees between the code and the entries, one line each."""
    found: list[str] = []
    documented = [name for entry in option_entries for name in entry.names]
    for name in known_options:
        if name not in documented:
            found.append(f"--{name} has no entry in {OPTION_ENTRIES.name}")
    for entry in option_entries:
        where = f"{OPTION_ENTRIES.name}:{entry.line}"
        name = entry.names[0]
        option = known_options.get(name)
        if len(entry.names) > 1:
            found.append(f"{where}: one option an entry, not {len(entry.names)}")
        elif option is None:
            found.append(f"{where}: --{name} is no option of twistd tlsproxy")
        elif option.takes_argument != bool(entry.argument):
            takes = "takes an argument" if option.takes_argument else "is a flag"
            found.append(f"{where}: --{name} {takes}")
        elif option.default is not None and "Default" in " ".join(entry.text):
            found.append(f"{where}: --{name}'s default is the code's, not the text's")
        if not entry.text:
            found.append(f"{where}: --{name} has no text")
    for name in sorted({n for n in documented if documented.count(n) > 1}):
        found.append(f"--{name} has more than one entry in {OPTION_ENTRIES.name}")
    for name in set(known_options) - set(KINDS) - PROCESS_WIDE:
        found.append(f"--{name} is not a key of --config files (tap.KINDS)")
    described = [name for entry in field_entries for name in entry.names]
    for name in known_fields:
        if name not in described:
            found.append(f"{name} has no entry in {FIELD_ENTRIES.name}")
    for entry in field_entries:
        where = f"{FIELD_ENTRIES.name}:{entry.line}"
        for name in entry.names:
            if name not in known_fields:
                found.append(f"{where}: {name} is no field of ConnectionRecord")
        if not entry.text:
            found.append(f"{where}: {', '.join(entry.names)} has no text")
    for name in sorted({n for n in described if described.count(n) > 1}):
        found.append(f"{name} has more than one entry in {FIELD_ENTRIES.name}")
    return found


Line = tuple[str, str, int]
"""A line of reST, with the file and line number it comes from."""


def _indented(entry: Entry) -> list[Line]:
    """The text of C{entry}, indented under its term, with where it was written."""
    first = entry.line + 1
    return [
        (f"    {line}" if line else "", entry.source, first + number)
        for number, line in enumerate(entry.text)
    ]


def option_lines(entry: Entry, option: Option, key: bool, where: Line) -> list[Line]:
    """
    The reST of one option: its term (on the command line, or as a key of a
    --config file), its C{--help} text, its entry's text, then what the code
    says of it.  C{where} is the directive's file and line, for what is made.
    """
    _, source, line = where
    argument = entry.argument
    if key:
        term = f"``{option.name} = {argument or 'yes|no'}``"
    else:
        term = f"``--{option.name}{' ' + argument if argument else ''}``"
    facts, default = [], option.default
    if default is not None and len(default) <= _INLINE:
        facts.append(f"Default: ``{default}``.")
    if option.repeatable:
        facts.append(
            "One value per line, the lines after the first indented."
            if key
            else "Repeatable."
        )
    if option.process_wide:
        facts.append("Process-wide: on the command line, never in a ``--config`` file.")
    after = []
    if facts:
        after += ["", "    " + "  ".join(facts)]
    if default is not None and len(default) > _INLINE:
        # On a line of its own, which a man page need not break.
        after += ["", "    Default::", "", f"        {default}"]
    return [
        *((text, source, line) for text in (term, f"    {option.help}", "")),
        *_indented(entry),
        *((text, source, line) for text in (*after, "")),
    ]


def field_lines(entry: Entry, types: dict[str, str], where: Line) -> list[Line]:
    """The reST of one entry of fields: their names and JSON types, its text."""
    _, source, line = where
    term = ", ".join(f"``{name}`` ({types[name]})" for name in entry.names)
    return [(term, source, line), *_indented(entry), ("", source, line)]


class _Reference(SphinxDirective):
    """What the three directives share: read, check, render."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        for path in (OPTION_ENTRIES, FIELD_ENTRIES):
            self.env.note_dependency(str(path))
        known_options, known_fields = options(), fields()
        option_entries = read_entries(OPTION_ENTRIES)
        field_entries = read_entries(FIELD_ENTRIES)
        found = problems(known_options, known_fields, option_entries, field_entries)
        for problem in found:
            _log.warning(problem, location=self.get_location())
        where = ("", self.get_source_info()[0], self.lineno)
        text = StringList()
        if not found:
            for line in self.render(known_options, known_fields, where):
                text.append(*line)
        container = nodes.container()
        self.state.nested_parse(text, self.content_offset, container)
        return list(container.children)

    def render(
        self,
        known_options: dict[str, Option],
        known_fields: dict[str, str],
        where: Line,
    ) -> Iterable[Line]:
        raise NotImplementedError


class OptionsDirective(_Reference):
    """Every option of C{twistd tlsproxy}, in the entries' order."""

    def render(
        self,
        known_options: dict[str, Option],
        known_fields: dict[str, str],
        where: Line,
    ) -> Iterable[Line]:
        for entry in read_entries(OPTION_ENTRIES):
            yield from option_lines(entry, known_options[entry.names[0]], False, where)


class ConfigKeysDirective(_Reference):
    """Every key of a C{--config} file: the options that are not process-wide."""

    def render(
        self,
        known_options: dict[str, Option],
        known_fields: dict[str, str],
        where: Line,
    ) -> Iterable[Line]:
        for entry in read_entries(OPTION_ENTRIES):
            option = known_options[entry.names[0]]
            if not option.process_wide:
                yield from option_lines(entry, option, True, where)


class FieldsDirective(_Reference):
    """Every field of a connection record, in the entries' order."""

    def render(
        self,
        known_options: dict[str, Option],
        known_fields: dict[str, str],
        where: Line,
    ) -> Iterable[Line]:
        for entry in read_entries(FIELD_ENTRIES):
            yield from field_lines(entry, known_fields, where)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("tlsproxy-options", OptionsDirective)
    app.add_directive("tlsproxy-config-keys", ConfigKeysDirective)
    app.add_directive("tlsproxy-fields", FieldsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
