"""
The size of the proxy: the non-blank, non-comment lines (docstrings
included) of every module that C{twistd tlsproxy} imports, and of the
plugin.  Prints each module and the total; exits 1 if the total is over
BUDGET or a module of tlsproxy/ is over 300 lines.

    python tests/size.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
BUDGET = 2300
MOST = 300  # lines in one module, blank ones too


def imported() -> list[Path]:
    """The files of tlsproxy's modules that the plugin's tap imports."""
    code = (
        "import json, sys, tlsproxy.tap;"
        "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items()"
        " if n == 'tlsproxy' or n.startswith('tlsproxy.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return [Path(path) for path in json.loads(out)]


def counted(path: Path) -> int:
    """Its lines that are neither blank nor a comment."""
    return sum(
        1 for line in path.read_text().splitlines() if not re.match(r"\s*($|#)", line)
    )


def main() -> int:
    files = [*imported(), TOP / "twisted" / "plugins" / "tlsproxy_plugin.py"]
    total = 0
    for path in files:
        total += counted(path)
        print(f"{counted(path):5d} {path.relative_to(TOP)}")
    print(f"{total:5d} lines in all (budget {BUDGET})")
    long = [
        p
        for p in (TOP / "tlsproxy").glob("*.py")
        if len(p.read_text().splitlines()) > MOST
    ]
    for path in long:
        print(f"over {MOST} lines: {path.relative_to(TOP)}")
    return int(total > BUDGET or bool(long))


if __name__ == "__main__":
    sys.exit(main())
