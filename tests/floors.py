"""
Print pip constraints pinning each of setup.cfg's install_requires to the
oldest version it allows (C{name>=X} becomes C{name==X}), for the gate in
C{tests/run.sh} that runs the in-memory tests on them: a floor nobody runs
is a floor nobody knows holds (pyOpenSSL 24 and 25 were allowed, and there
C{--sni-strict} did not refuse).
"""

from __future__ import annotations

import configparser
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def floors(text: str) -> list[str]:
    config = configparser.ConfigParser()
    config.read_string(text)
    lines = config["options"]["install_requires"].splitlines()
    return [line.replace(">=", "==") for line in map(str.strip, lines) if line]


if __name__ == "__main__":
    print("\n".join(floors(SETUP_CFG.read_text())))
