"""The README's curl examples work as written (its tables are checked in tests/test_readme.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_curl_examples_work_against_the_demo_server(server):
    blocks = [b for b in re.findall(r"```bash\n(.+?)\n```", README, flags=re.S) if "curl" in b]
    assert len(blocks) >= 6
    port = server.url.rsplit(":", 1)[1]
    for block in blocks:
        script = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, (block, out.stderr)
        assert out.stdout.strip(), block
        # an error body, not a field that says there is none (a Response's "error": null)
        assert not re.search(r'"error":\s*\{', out.stdout), (block, out.stdout[:500])
