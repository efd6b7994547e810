"""
Sphinx configuration: the HTML docs, the man pages, and the API reference
that pydoctor makes from the docstrings (epytext, as Twisted's).

    .venv/bin/sphinx-build -W -b html docs docs/_build/html
    .venv/bin/sphinx-build -W -b man docs docs/_build/man
"""

from __future__ import annotations

import configparser
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TOP = DOCS.parent
sys.path[:0] = [str(DOCS / "_ext"), str(TOP)]

import tlsproxy  # noqa: E402 (from TOP)

EMBEDDING = [
    *(f"tlsproxy.{name}" for name in tlsproxy.__all__),
    "tlsproxy.listen.SharedLimit",
    "tlsproxy.sandbox.confine",
]
"""The embedding API: what tlsproxy exports, and two names beside it."""

project = "tlsproxy"
author = "the tlsproxy authors"
copyright = "the tlsproxy authors"
_setup = configparser.ConfigParser()
_setup.read(TOP / "setup.cfg")
release = version = _setup["metadata"]["version"]

extensions = [
    "sphinx.ext.intersphinx",
    "pydoctor.sphinx_ext.build_apidocs",
    "tlsproxy_reference",
    "manpage_references",
]
exclude_patterns = ["_build", "_entries"]
nitpicky = True
today_fmt = "%Y-%m-%d"
# "--listen" stays two hyphens, in HTML and in the man pages.
smartquotes = False

html_theme = "alabaster"
html_title = "tlsproxy"

# The API reference: pydoctor writes it into the HTML output's api/, and its
# inventory lets the pages link to it (:py:class:`tlsproxy.ProxyConfig`).
# Only during the html build; nothing is fetched from the network.
pydoctor_args = [
    "--project-name=tlsproxy",
    f"--project-base-dir={TOP}",
    "--docformat=epytext",
    "--html-output={outdir}/api",
    # The embedding API is public; the modules behind it are shown as
    # private (pydoctor's "Toggle Private API" shows them).
    "--privacy=PRIVATE:tlsproxy.*",
    "--privacy=PUBLIC:tlsproxy.listen",
    "--privacy=PUBLIC:tlsproxy.sandbox",
    *(
        f"--privacy=PUBLIC:{name}{part}"
        for name in EMBEDDING
        for part in ("", ".[!_]*")
    ),
    str(TOP / "tlsproxy"),
]
pydoctor_url_path = "api/"
intersphinx_mapping: dict[str, tuple[str, tuple[str, ...] | None]] = {}

# The man pages, each a page of these docs too.  make_section_directory puts
# them in man1/, man5/ and man8/, ready to copy under a MANPATH directory.
man_pages = [
    ("man/tlsproxy", "tlsproxy", "a TLS-terminating TCP proxy, run by twistd", [], 8),
    (
        "man/tlsproxy.conf",
        "tlsproxy.conf",
        "the services of twistd tlsproxy --config",
        [],
        5,
    ),
    (
        "man/tlsproxy-logjoin",
        "tlsproxy-logjoin",
        "give a web server's access log its clients' addresses back",
        [],
        1,
    ),
    (
        "man/tlsproxy-stunnel2conf",
        "tlsproxy-stunnel2conf",
        "translate a stunnel configuration for twistd tlsproxy",
        [],
        1,
    ),
]
man_make_section_directory = True
