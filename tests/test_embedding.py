"""
The embedding guide's example (docs/guide/embedding.rst), run as another
application would: a .tac file under the real twistd.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from unittest import TestCase

from .harness import (
    HELLO,
    curl_ok,
    make_certificates,
    start_http_backend,
    temp_dir,
    wait_until,
)

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guide" / "embedding.rst"


def embedding_example() -> str:
    """The first literal block of the embedding guide."""
    block = GUIDE.read_text().split("::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


class EmbeddingTests(TestCase):
    """Another Twisted application builds the proxy in a few lines."""

    def test_guide_example(self) -> None:
        """
        The guide's example, with its ports and files made real, serves
        curl through to the backend.
        """
        directory = temp_dir(self)
        certificates = make_certificates(directory)
        shutil.copy(certificates.cert, directory / "server.pem")
        shutil.copy(certificates.key, directory / "server.key")
        backend = start_http_backend(self)
        example = embedding_example()
        self.assertIn('listen="tcp:8443"', example)
        self.assertIn('connect="tcp:127.0.0.1:8080"', example)
        tac = example.replace('"tcp:8443"', '"tcp:0:interface=127.0.0.1"').replace(
            '"tcp:127.0.0.1:8080"', f'"tcp:127.0.0.1:{backend.port}"'
        )
        (directory / "example.tac").write_text(tac)
        log = directory / "twistd.log"
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("twistd")),
                "-n",
                "--logfile",
                str(log),
                "--pidfile",
                "",
                "-y",
                "example.tac",
            ],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def stop() -> None:
            process.send_signal(signal.SIGTERM)
            process.wait(20)

        self.addCleanup(stop)
        found: list[str] = []

        def listening() -> bool:
            text = log.read_text() if log.exists() else ""
            found[:] = re.findall(r"starting on (\d+)", text)
            if process.poll() is not None:
                raise AssertionError(f"twistd exited:\n{text}")
            return bool(found)

        wait_until(listening, "the example to listen")
        body = curl_ok(
            "--cacert", str(certificates.ca), f"https://localhost:{found[0]}/"
        )
        self.assertEqual(body, HELLO)
        self.assertNotIn("Traceback", log.read_text())
