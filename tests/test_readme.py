"""The README stays true to the code: its endpoint table lists the app's routes, its settings
table every setting, CI runs its test command; SECURITY.md's flags exist, and so does every file
the docs cite (the curl examples run in tests/server/test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

from edgevl.server.app import create_app
from edgevl.server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / ".ci" / "run",
        *sorted((ROOT / "deploy").iterdir())]
CITED = re.compile(r"(?<![\w./~-])((?:[\w.-]+/)*[\w-]+\.(?:py|md|yaml|sh|json|png|service|toml))\b")
# Swagger UI's OAuth helper page, part of /docs; edgevl has no OAuth login
NOT_IN_TABLE = {("GET", "/docs/oauth2-redirect")}


def _section(title: str) -> str:
    return README.split(f"\n{title}\n", 1)[1].split("\n#", 1)[0]


def app_routes() -> set[tuple[str, str]]:
    app = create_app(Settings())  # routes exist before the lifespan loads a model
    routes = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    for route in app.routes:  # those left out of the schema: the page, /metrics, the docs pages
        routes |= {(m, route.path) for m in getattr(route, "methods", None) or () if m != "HEAD"}
    return routes - NOT_IN_TABLE


def test_the_endpoint_table_lists_exactly_the_apps_routes():
    rows = [line for line in _section("### Endpoints").splitlines() if line.startswith("| `")]
    documented = {(m, p) for row in rows for m, p in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/\S*)`",
                                                                  row.split(" | ")[0])}
    routes = app_routes()
    assert routes - documented == set(), "routes missing from the README's endpoint table"
    assert documented - routes == set(), "the README's endpoint table names routes the app does not have"


def test_every_setting_is_documented_with_its_flag_and_variable():
    for name, field in Settings.model_fields.items():
        flag, env = f"--{name.replace('_', '-')}", f"EDGEVL_{name.upper()}"
        row = next((line for line in README.splitlines() if line.startswith(f"| `{flag}` |")), None)
        assert row is not None, f"{flag} is not in the README's settings table"
        assert f"`{env}`" in row and field.description in row


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", README, flags=re.S)
    test_cmd = next(c for c in commands if "pytest" in c)
    assert test_cmd.strip().replace("pip install", "pip install -q") in ci


def test_every_flag_security_md_names_is_a_flag_of_serve():
    flags = {f"--{name.replace('_', '-')}" for name in Settings.model_fields}
    named = set(re.findall(r"`(--[a-z-]+)", (ROOT / "SECURITY.md").read_text()))
    assert named and named <= flags, named - flags


def test_every_file_the_docs_cite_exists():
    """Paths (from the repository, the citing file or edgevl/) and Markdown files by name."""
    names = {p.name for p in ROOT.rglob("*.md")}
    missing = []
    for doc in DOCS:
        for cited in set(CITED.findall(doc.read_text())):
            if "/" in cited:
                found = any((base / cited).exists() for base in (ROOT, doc.parent, ROOT / "edgevl"))
            else:
                found = not cited.endswith(".md") or cited in names
            if not found:
                missing.append(f"{doc.relative_to(ROOT)}: {cited}")
    assert missing == []
