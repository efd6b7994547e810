"""
README.rst is the manual: it must be valid reStructuredText, or PyPI and
GitHub show a broken page (a table too narrow for its figures did once).
"""

from __future__ import annotations

import io
from pathlib import Path

from docutils.core import publish_doctree
from twisted.trial.unittest import SynchronousTestCase

README = Path(__file__).resolve().parent.parent / "README.rst"


def problems(text: str) -> str:
    """What docutils says about C{text}, at the level of warnings and above."""
    said = io.StringIO()
    publish_doctree(
        text, settings_overrides={"warning_stream": said, "report_level": 2}
    )
    return said.getvalue()


class ReadmeTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """docutils reads README.rst without a warning."""
        self.assertEqual(problems(README.read_text(encoding="utf-8")), "")

    def test_detects(self) -> None:
        """A table cell wider than its column is reported."""
        table = "====  ====\na     b\n====  ====\n12345 x\n====  ====\n"
        self.assertIn("Malformed table", problems(table))
