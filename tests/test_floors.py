"""
tests/floors.py: the oldest versions setup.cfg allows, as pip constraints.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from .floors import SETUP_CFG, floors


class FloorsTests(SynchronousTestCase):
    def test_pins(self) -> None:
        """Each C{>=} becomes C{==}; comment lines are dropped."""
        text = "[options]\ninstall_requires =\n    a>=1.2\n    # why\n    b>=3\n"
        self.assertEqual(floors(text), ["a==1.2", "b==3"])

    def test_pyopenssl(self) -> None:
        """
        pyOpenSSL stays at 26 or later: before 26.0 an exception in the SNI
        callback was swallowed, and --sni-strict served the default
        certificate (CVE-2026-27448).
        """
        [pin] = [p for p in floors(SETUP_CFG.read_text()) if p.startswith("pyOpenSSL")]
        self.assertGreaterEqual(int(pin.split("==")[1].split(".")[0]), 26)
