"""The README stays true: its settings table matches Settings, its curl examples work as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from edgevl.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented_with_its_flag_and_variable():
    for name, field in Settings.model_fields.items():
        flag, env = f"--{name.replace('_', '-')}", f"EDGEVL_{name.upper()}"
        row = next((line for line in README.splitlines() if line.startswith(f"| `{flag}` |")), None)
        assert row is not None, f"{flag} is not in the README's settings table"
        assert f"`{env}`" in row and field.description in row


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
        assert '"error"' not in out.stdout, (block, out.stdout[:500])
