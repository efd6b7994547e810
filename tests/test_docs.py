"""
The docs cannot drift from the code: every option of C{twistd tlsproxy} and
every connection-log field has its entry in docs/_entries/ (which
docs/_ext/tlsproxy_reference.py renders into tlsproxy(8) and
tlsproxy.conf(5)), every command has its man page, and the examples the
docs show give what they say.  tests/run.sh builds the docs themselves.
"""

from __future__ import annotations

import configparser
import importlib.util
import runpy
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy import stunnel
from tlsproxy.record import ConnectionRecord
from tlsproxy.tap import Options

TOP = Path(__file__).resolve().parent.parent
DOCS = TOP / "docs"


def _load(name: str) -> ModuleType:
    """The module C{docs/_ext/NAME.py}, as Sphinx's conf.py loads it."""
    spec = importlib.util.spec_from_file_location(name, DOCS / "_ext" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # attrs classes look their module up
    spec.loader.exec_module(module)
    return module


reference = _load("tlsproxy_reference")


class MoreOptions(Options):
    """The options, and three new ones that no entry documents."""

    optParameters = [*Options.optParameters, ["frobnicate", None, None, "F."]]
    optFlags = [*Options.optFlags, ["wobble", None, "W."]]

    def opt_extra(self, value: str) -> None:
        """E."""


@attrs.frozen(kw_only=True)
class MoreRecord(ConnectionRecord):
    """A connection record with one more field."""

    extra: int = 0


def entries(case: SynchronousTestCase, text: str) -> list[Any]:
    """The entries of C{text}, written to a file of their own."""
    path = Path(case.mktemp())
    path.write_text(textwrap.dedent(text))
    return list(reference.read_entries(path))


class ReferenceTests(SynchronousTestCase):
    """The generated reference covers the code, and only the code."""

    def found(
        self,
        options_class: type[Options] = Options,
        record_class: type[Any] = ConnectionRecord,
        option_entries: list[Any] | None = None,
        field_entries: list[Any] | None = None,
    ) -> list[str]:
        """What L{reference.problems} finds, with these in place of the real ones."""
        return list(
            reference.problems(
                reference.options(options_class),
                reference.fields(record_class),
                reference.read_entries(reference.OPTION_ENTRIES)
                if option_entries is None
                else option_entries,
                reference.read_entries(reference.FIELD_ENTRIES)
                if field_entries is None
                else field_entries,
            )
        )

    def test_complete(self) -> None:
        """Every option and every field has one entry, and the entries agree."""
        self.assertEqual(self.found(), [])

    def test_every_option(self) -> None:
        """The options are all of Options', each once, and none of twistd's."""
        names = reference.options()
        self.assertIn("listen", names)
        self.assertIn("allow-uri", names)
        self.assertNotIn("help", names)
        self.assertEqual(len(names), len(Options().longOpt) - 2)

    def test_new_option(self) -> None:
        """An option added to Options without an entry is found, of each kind."""
        found = self.found(options_class=MoreOptions)
        self.assertIn("--frobnicate has no entry in options.rst", found)
        self.assertIn("--wobble has no entry in options.rst", found)
        self.assertIn("--extra has no entry in options.rst", found)
        self.assertIn("--extra is not a key of --config files (tap.KINDS)", found)

    def test_new_field(self) -> None:
        """A field added to the record without an entry is found."""
        found = self.found(record_class=MoreRecord)
        self.assertEqual(found, ["extra has no entry in fields.rst"])

    def test_stale_entries(self) -> None:
        """An entry for no option, or for no field, is found."""
        gone = entries(self, "--gone FILE\n    Text.\n")
        self.assertIn(
            "options.rst:1: --gone is no option of twistd tlsproxy",
            self.found(option_entries=gone),
        )
        fields = entries(self, "event, gone\n    Text.\n")
        self.assertIn(
            "fields.rst:1: gone is no field of ConnectionRecord",
            self.found(field_entries=fields),
        )

    def test_disagreements(self) -> None:
        """An entry that disagrees with the code on an option is found."""
        text = """
            --quiet LEVEL
                A flag given an argument.
            --listen
                A value given none.
            --connect ENDPOINT
            --idle-timeout S
                Default: 60, where the code says otherwise.
            --cert FILE
                Once.
            --cert FILE
                Twice.
            --key, --alpn FILE
                Two options in one entry.
            """
        found = self.found(option_entries=entries(self, text))
        for problem in [
            "options.rst:2: --quiet is a flag",
            "options.rst:4: --listen takes an argument",
            "options.rst:6: --connect has no text",
            "options.rst:7: --idle-timeout's default is the code's, not the text's",
            "--cert has more than one entry in options.rst",
            "options.rst:13: one option an entry, not 2",
        ]:
            self.assertIn(problem, found)

    def test_read_entries(self) -> None:
        """Comments are skipped; an entry is its names, argument and text."""
        text = """
            .. A comment,
               on two lines.

            --cert FILE
                First.

                Second.
            client_host, client_port
                Where.
            """
        [cert, client] = entries(self, text)
        self.assertEqual(cert.names, ("cert",))
        self.assertEqual(cert.argument, "FILE")
        self.assertEqual(cert.text, ("First.", "", "Second."))
        self.assertEqual(cert.line, 5)
        self.assertEqual(client.names, ("client_host", "client_port"))
        self.assertEqual(client.argument, "")

    def test_json_types(self) -> None:
        """Each field's JSON type is read from its annotation."""
        types = reference.fields()
        self.assertEqual(types["event"], "string")
        self.assertEqual(types["client_port"], "integer or null")
        self.assertEqual(types["opened"], "number")
        self.assertEqual(list(types)[-1], "reason")

    def test_long_default(self) -> None:
        """A long default (the ciphers') is a literal block, not a word in a line."""
        [entry] = entries(self, "--ciphers STRING\n    Text.\n")
        option = reference.options()["ciphers"]
        made = reference.option_lines(entry, option, False, ("", "x", 1))
        lines = [text for text, _, _ in made]
        self.assertIn("    Default::", lines)
        self.assertIn(f"        {option.default}", lines)

    def test_config_keys(self) -> None:
        """As a --config key, a flag is yes|no and a repeatable one a line each."""
        [flag, values] = entries(self, "--quiet\n    Q.\n--cert FILE\n    C.\n")
        options = reference.options()
        where = ("", "x", 1)
        quiet = reference.option_lines(flag, options["quiet"], True, where)
        cert = reference.option_lines(values, options["cert"], True, where)
        self.assertEqual(quiet[0][0], "``quiet = yes|no``")
        self.assertEqual(cert[0][0], "``cert = FILE``")
        self.assertIn("One value per line", " ".join(text for text, _, _ in cert))


class ManPageTests(SynchronousTestCase):
    """Each command has its man page, built by Sphinx's man builder."""

    def test_pages(self) -> None:
        """tlsproxy(8), tlsproxy.conf(5), and one page per console script."""
        path = list(sys.path)
        self.addCleanup(sys.path.__setitem__, slice(None), path)
        conf = runpy.run_path(str(DOCS / "conf.py"))
        pages = {(name, section) for _, name, _, _, section in conf["man_pages"]}
        setup = configparser.ConfigParser()
        setup.read(TOP / "setup.cfg")
        scripts = setup["options.entry_points"]["console_scripts"].split()[::3]
        self.assertIn("tlsproxy-logjoin", scripts)
        expected = {("tlsproxy", 8), ("tlsproxy.conf", 5)}
        expected |= {(script, 1) for script in scripts}
        self.assertEqual(pages, expected)
        for source, *_ in conf["man_pages"]:
            self.assertTrue((DOCS / f"{source}.rst").is_file())


def literal_blocks(path: Path, after: str) -> list[str]:
    """The literal blocks of C{path} that follow the line C{after}, dedented."""
    text = path.read_text().split(f"\n{after}\n", 1)[1]
    blocks = []
    for block in text.split("::\n\n")[1:]:
        lines = []
        for line in block.splitlines():
            if line and not line.startswith(" "):
                break
            lines.append(line)
        blocks.append(textwrap.dedent("\n".join(lines)).strip("\n") + "\n")
    return blocks


class ExampleTests(SynchronousTestCase):
    """The examples of the man pages give what they say."""

    def test_stunnel2conf(self) -> None:
        """tlsproxy-stunnel2conf(1)'s example is what the command prints."""
        page = DOCS / "man" / "tlsproxy-stunnel2conf.rst"
        given, printed = literal_blocks(page, "Example")[:2]
        path = Path(self.mktemp())
        path.write_text(given)
        out: list[str] = []
        self.assertEqual(stunnel.main([str(path)], out.append), 0)
        self.assertEqual("".join(out).replace(str(path), "stunnel.conf"), printed)
