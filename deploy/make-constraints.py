#!/usr/bin/env python3
"""Pins edgevl's runtime dependencies, and theirs, at the versions installed here:
    python deploy/make-constraints.py > deploy/constraints.txt
Run it in the environment the tests passed in. The image and CI install with `-c` this file, so a
box rebuilt later runs what was tested; extras (torch, transformers, test tools) are not pinned
beyond the runtime packages they share."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(requirements: list[str]) -> dict[str, str]:
    """{name: installed version} of the requirements and everything they need here."""
    pinned: dict[str, str] = {}
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, extras_of_parent = todo.pop()
        env = [{"extra": e} for e in extras_of_parent] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(e) for e in env):
            continue
        name = canonicalize_name(req.name)
        dist = metadata.distribution(req.name)
        if name in pinned and not req.extras:
            continue
        pinned[name] = dist.version
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return pinned


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = closure(deps)
    print("# edgevl's runtime dependencies and theirs, pinned at the versions the tests passed with.")
    print(f"# Made by deploy/make-constraints.py (Python {sys.version_info.major}.{sys.version_info.minor}); "
          "used with `pip install -c` by deploy/Dockerfile and .ci/run.")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
