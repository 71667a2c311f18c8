"""The image, the compose file and the systemd unit agree with each other and with the server."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from edgevl.server.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
ENTRYPOINT = (DEPLOY / "docker-entrypoint.sh").read_text()
UNIT = (DEPLOY / "edgevl.service").read_text()
SERVICE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["edgevl"]
NOT_SETTINGS = {"EDGEVL_CACHE"}  # read by the engine's cache, not by Settings


def _unit(key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", UNIT, flags=re.M)


def _unit_env() -> dict[str, str]:
    return dict(line.split("=", 1) for line in _unit("Environment"))


def test_every_edgevl_variable_set_anywhere_is_one_the_server_reads():
    # Settings ignores unknown EDGEVL_* variables, so a misspelt one would be silently dropped
    known = {f"EDGEVL_{name.upper()}" for name in Settings.model_fields} | NOT_SETTINGS
    used = set(re.findall(r"\b(EDGEVL_[A-Z_]+)=", DOCKERFILE)) | set(SERVICE["environment"]) | set(_unit_env())
    assert used and used <= known, used - known


def test_the_model_mount_and_the_cache_volume_are_where_the_image_looks():
    targets = [v.rsplit(":ro", 1)[0].rsplit(":", 1)[1] for v in SERVICE["volumes"]]
    assert "/models/qwen3-vl" in targets and "MOUNT=/models/qwen3-vl" in ENTRYPOINT
    cache = re.search(r"EDGEVL_CACHE=(\S+)", DOCKERFILE).group(1)
    assert cache in targets and f'VOLUME ["{cache}"]' in DOCKERFILE
    assert _unit_env()["EDGEVL_CACHE"] == cache and cache in _unit("ReadWritePaths")


def test_in_flight_answers_finish_before_the_supervisor_kills():
    env = SERVICE["environment"]
    assert float(env["EDGEVL_GRACE_PERIOD_S"]) < int(SERVICE["stop_grace_period"].removesuffix("s"))
    assert float(_unit_env()["EDGEVL_GRACE_PERIOD_S"]) < int(_unit("TimeoutStopSec")[0])


def test_threads_and_memory_budget_fit_the_limits():
    env = SERVICE["environment"]
    assert int(env["EDGEVL_THREADS"]) == SERVICE["cpus"]
    assert int(_unit_env()["EDGEVL_THREADS"]) * 100 == int(_unit("CPUQuota")[0].removesuffix("%"))
    limit_mb = int(SERVICE["mem_limit"].removesuffix("g")) * 1024
    assert int(env["EDGEVL_MAX_MEMORY_MB"]) < limit_mb
    unit_budget = int(re.search(r"--max-memory-mb (\d+)", _unit("ExecStart")[0]).group(1))
    assert unit_budget < int(_unit("MemoryMax")[0].removesuffix("G")) * 1024


def test_the_unit_passes_only_serve_flags_and_the_image_runs_serve_unprivileged_with_a_health_check():
    flags = {f"--{name.replace('_', '-')}" for name in Settings.model_fields}
    passed = [a for a in _unit("ExecStart")[0].split() if a.startswith("--")]
    assert passed and set(passed) <= flags, set(passed) - flags
    assert "USER edgevl" in DOCKERFILE and "/api/health" in DOCKERFILE.split("HEALTHCHECK", 1)[1]
    assert 'exec edgevl serve "$@"' in ENTRYPOINT and 'ENTRYPOINT ["edgevl-entrypoint"]' in DOCKERFILE


ROOT = DEPLOY.parent
CONSTRAINTS = (DEPLOY / "constraints.txt").read_text()


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = [line.split("#", 1)[0].strip() for line in CONSTRAINTS.splitlines()]
    return {canonicalize_name(n): v for n, v in (line.split("==", 1) for line in lines if line)}


def test_the_image_and_ci_install_with_the_constraints():
    assert "deploy/constraints.txt" in re.search(r"^COPY .*constraints\.txt.*$", DOCKERFILE, flags=re.M).group(0)
    installs = [line for line in DOCKERFILE.splitlines()
                if "pip install" in line and "--no-deps" not in line and not line.startswith("#")]
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert "!deploy/constraints.txt" in (ROOT / ".dockerignore").read_text().splitlines()
    ci_installs = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert ci_installs and all("-c deploy/constraints.txt" in line for line in ci_installs)


def test_the_constraints_pin_every_runtime_dependency_within_pyproject_and_theirs():
    import importlib.util

    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _pins()
    deps = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for req in deps:
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is not pinned"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {req.specifier}"
    # and what they need, as installed here (names: versions are whatever this environment has)
    spec = importlib.util.spec_from_file_location("make_constraints", DEPLOY / "make-constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    needed = set(module.closure([str(r) for r in deps]))
    assert needed - set(pins) == set(), "runtime packages missing from deploy/constraints.txt"
