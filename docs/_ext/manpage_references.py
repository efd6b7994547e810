"""
Man pages: a reference to another page of these docs is its title in
italics, as Sphinx writes it, not C{Title <#label>}.

Docutils 0.22's man page translator sets C{visit_reference} on each
instance, which hides Sphinx's own method (sphinx-doc/sphinx issue 14427,
open with Sphinx 9.0.4): this translator takes Sphinx's back, as the
proposed fix upstream does.  Without it the man pages still build, with
C{<>} after every link.
"""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.builders import Builder
from sphinx.writers.manpage import ManualPageTranslator


class Translator(ManualPageTranslator):
    """Sphinx's man page translator, with its own C{visit_reference}."""

    def __init__(self, document: nodes.document, builder: Builder) -> None:
        super().__init__(document, builder)
        self.__dict__.pop("visit_reference", None)
        self.__dict__.pop("depart_reference", None)
        self.defs.setdefault("reference", (r"\fI\%", r"\fP"))


def setup(app: Sphinx) -> dict[str, Any]:
    app.set_translator("man", Translator)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
