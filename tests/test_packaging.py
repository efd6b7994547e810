"""
Packaging tests: tlsproxy installed from this tree into a fresh virtual
environment, as a wheel or editable, is a twistd plugin there; and the wheel
ships nothing under C{twisted/} but the plugin module.

These need PyPI: pip fetches the build backend and tlsproxy's dependencies
(its cache makes every run after the first fast).  Every subprocess is
bounded in time.

pip builds a local directory in place, and setuptools ships whatever an
earlier build left in C{build/lib}, even files since removed from the tree.
So the wheel and the plain install are built from a clean copy of the tree;
only the editable install uses the tree itself (it adds C{tlsproxy.egg-info},
which git ignores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent
"""The project tree these tests install (the one holding this file)."""

PIP_TIMEOUT = 600.0
"""Seconds for one pip run: it may download and build."""

RUN_TIMEOUT = 120.0
"""Seconds for any other subprocess (venv creation, twistd --help)."""


def outside_dir(case: TestCase) -> Path:
    """
    Return a new directory outside the project tree, removed when C{case}
    ends: nothing there can be mistaken for the tree under test.
    """
    path = Path(tempfile.mkdtemp(prefix="tlsproxy-packaging-"))
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def clean_copy(case: TestCase) -> Path:
    """
    Return a copy of the project tree as a fresh checkout has it (nothing
    that .gitignore names), plus a C{twisted/plugins/dropin.cache} such as
    twistd writes into any tree it has run from.
    """
    ignored = [".git"]
    for line in (ROOT / ".gitignore").read_text().splitlines():
        pattern = line.strip().rstrip("/")
        if pattern and not pattern.startswith(("#", "!")):
            ignored.append(pattern)
    copy = outside_dir(case) / "tree"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*ignored))
    (copy / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    return copy


def _environment() -> dict[str, str]:
    """
    Return this process's environment without what would make a child
    Python see anything but its own virtual environment.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def run(command: Sequence[str | Path], cwd: Path, timeout: float) -> str:
    """
    Run C{command} in C{cwd}; return its standard output, failing the test
    if it exits non-zero or runs longer than C{timeout} seconds.
    """
    argv = [str(part) for part in command]
    try:
        result = subprocess.run(
            argv,
            cwd=cwd,
            env=_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{argv} ran longer than {timeout}s") from None
    if result.returncode != 0:
        raise AssertionError(
            f"{argv} exited {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')}\n"
            f"{result.stderr.decode(errors='replace')}"
        )
    return result.stdout.decode("utf-8", errors="replace")


class InstallTests(TestCase):
    """
    pip install, plain or editable, makes twistd offer tlsproxy.
    """

    def install(self, *how: str | Path) -> tuple[Path, Path]:
        """
        Make a fresh virtual environment and run its C{pip install HOW};
        return the environment and a directory (outside the tree) to run
        commands in.
        """
        place = outside_dir(self)
        venv = place / "venv"
        # The new environment does not see this one's site-packages.
        run([sys.executable, "-m", "venv", venv], place, RUN_TIMEOUT)
        run([venv / "bin" / "pip", "install", *how], place, PIP_TIMEOUT)
        return venv, place

    def assert_plugin(self, venv: Path, place: Path, source: Path) -> None:
        """
        Check that C{venv}'s twistd lists tlsproxy and shows its options, and
        that the package and the plugin module are imported from C{source}.
        """
        listing = run([venv / "bin" / "twistd", "--help"], place, RUN_TIMEOUT)
        self.assertRegex(listing, r"(?m)^ +tlsproxy +Terminate TLS")
        usage = run([venv / "bin" / "twistd", "tlsproxy", "--help"], place, RUN_TIMEOUT)
        self.assertIn("--connect", usage)
        where = run(
            [
                venv / "bin" / "python",
                "-c",
                "import tlsproxy, twisted.plugins.tlsproxy_plugin as p;"
                " print(tlsproxy.__file__); print(p.__file__)",
            ],
            place,
            RUN_TIMEOUT,
        )
        for path in where.split():
            self.assertTrue(
                Path(path).resolve().is_relative_to(source.resolve()),
                f"{path} is not under {source}",
            )

    def test_install(self) -> None:
        """
        After pip install of the tree in a fresh venv, twistd --help lists
        tlsproxy, twistd tlsproxy --help shows --connect, and both come from
        the venv's own copy.
        """
        venv, place = self.install(clean_copy(self))
        self.assert_plugin(venv, place, venv)

    def test_editable_install(self) -> None:
        """
        After pip install -e of the tree in a fresh venv, twistd --help lists
        tlsproxy, twistd tlsproxy --help shows --connect, and both come from
        the tree.
        """
        venv, place = self.install("-e", ROOT)
        self.assert_plugin(venv, place, ROOT)


class WheelTests(TestCase):
    """
    The wheel adds one module to Twisted's plugin package, and nothing else
    under twisted/.
    """

    def test_only_the_plugin_under_twisted(self) -> None:
        """
        The wheel holds twisted/plugins/tlsproxy_plugin.py and no other file
        under twisted/: no __init__.py that would hide Twisted's own modules,
        and no dropin.cache.
        """
        tree = clean_copy(self)
        place = outside_dir(self)
        run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", place, tree],
            place,
            PIP_TIMEOUT,
        )
        wheels = list(place.glob("tlsproxy-*.whl"))
        self.assertEqual(len(wheels), 1, wheels)
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = wheel.namelist()
        self.assertIn("tlsproxy/__init__.py", names)
        self.assertIn("twisted/plugins/tlsproxy_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual(
            [name for name in names if name.startswith("twisted/")],
            ["twisted/plugins/tlsproxy_plugin.py"],
        )
