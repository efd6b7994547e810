"""
README.rst is the first page a newcomer reads (and PyPI's page): valid
reStructuredText, one screen or so, its two commands word for word, and its
links going somewhere.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from docutils.core import publish_doctree
from twisted.trial.unittest import SynchronousTestCase

from tlsproxy.tap import Options

TOP = Path(__file__).resolve().parent.parent
README = TOP / "README.rst"

SET_UP_AND_RUN = (
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/twistd -n"
    " tlsproxy --listen tcp:8443 --connect tcp:127.0.0.1:8080"
    " --self-signed localhost"
)
"""The quick start's first command: the issue asks for it word for word."""

TESTS = "sh tests/run.sh"
"""The quick start's second command: the test command CI runs too."""


def problems(text: str) -> str:
    """What docutils says about C{text}, at the level of warnings and above."""
    said = io.StringIO()
    publish_doctree(
        text, settings_overrides={"warning_stream": said, "report_level": 2}
    )
    return said.getvalue()


def literal_blocks(text: str) -> list[str]:
    """The literal blocks (after C{::}) of C{text}, dedented, in order."""
    blocks = []
    for block in text.split("::\n\n")[1:]:
        lines = []
        for line in block.splitlines():
            if line and not line.startswith(" "):
                break
            lines.append(line.strip())
        blocks.append("\n".join(lines).strip())
    return blocks


class ReadmeTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """docutils reads README.rst without a warning."""
        self.assertEqual(problems(README.read_text(encoding="utf-8")), "")

    def test_detects(self) -> None:
        """A table cell wider than its column is reported."""
        table = "====  ====\na     b\n====  ====\n12345 x\n====  ====\n"
        self.assertIn("Malformed table", problems(table))

    def test_short(self) -> None:
        """README.rst is 250 lines at most: the rest is in docs/."""
        self.assertLessEqual(len(README.read_text().splitlines()), 250)

    def test_commands(self) -> None:
        """The quick start's two commands are the ones promised, word for word."""
        section = README.read_text().split("\nQuick start\n", 1)[1]
        section = section.split("\n---", 1)[0].rsplit("\n", 1)[0]
        self.assertEqual(literal_blocks(section), [SET_UP_AND_RUN, TESTS])

    def test_run_options(self) -> None:
        """The quick start's tlsproxy options are valid ones."""
        options = Options()
        argv = SET_UP_AND_RUN.split(" tlsproxy ", 1)[1].split()
        options.parseOptions(argv)
        self.assertEqual(options.config.connect, "tcp:127.0.0.1:8080")
        self.assertEqual(options.config.listen, "tcp:8443")

    def test_links(self) -> None:
        """Every file README.rst links to is in the tree."""
        targets = re.findall(r"<([^<>]+)>`_", README.read_text())
        local = [t for t in targets if "://" not in t]
        self.assertIn("docs/index.rst", local)
        self.assertEqual([t for t in local if not (TOP / t).is_file()], [])

    def test_literal_blocks(self) -> None:
        """The blocks are read as the README writes them."""
        text = "Run::\n\n    a b \\\n        c\n\nthen::\n\n    d\n\nend\n"
        self.assertEqual(literal_blocks(text), ["a b \\\nc", "d"])
