"""Helpers for the compose tests: the repository's docker-compose.yml run on a real Docker engine,
as a user runs it, in a project of its own (own name, data directory, image tag, free host ports).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulator.testing import wait_until
from processor.schema import Observation
from processor.tests.helpers import ROOT
from processor.tests.helpers.oracle import Row, expected_rows

COMPOSE_FILE = ROOT / "docker-compose.yml"
MIN_COMPOSE = (2, 20)  # `name:` and `depends_on.required`
# Variables of the user's shell that would change which file, project or profiles compose uses.
_COMPOSE_ENV = (
    "COMPOSE_FILE",
    "COMPOSE_PROJECT_NAME",
    "COMPOSE_PROFILES",
    "DATABASE_URL",
    "DATABASE_URL_FILE",
    "DATABASE_SECRETS",
    "MIGRATE",
)
_LOG_LINE = re.compile(r"^(?P<container>[\w.-]+-\d+)\s+\|\s(?P<line>.*)$")


def _run(cmd: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def engine_problem() -> str | None:
    """Why compose cannot run here (no docker CLI, no engine, Compose too old), or None."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    info = _run(["docker", "info", "--format", "{{.ServerVersion}}"])
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine reachable ({reason})"
    version = _run(["docker", "compose", "version", "--short"])
    if version.returncode != 0:
        return "Docker Compose v2 is missing (`docker compose version` fails)"
    found = tuple(int(part) for part in re.findall(r"\d+", version.stdout)[:2])
    if found < MIN_COMPOSE:
        return f"Docker Compose {version.stdout.strip()} is older than v2.20, which the file needs"
    return None


@dataclass
class Stack:
    """One compose project of the repository's file."""

    name: str
    data_dir: Path
    image: str
    profiles: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    env_file: Path | None = None  # `--env-file`, as deploy/compose/postgres.env is used

    @property
    def owner(self) -> tuple[int, int]:
        """The uid and gid the containers run as and that own ./data: the image's user when the
        tests run as root, else the test's user, as README tells a user who reads ./data."""
        return (10001, 10001) if os.geteuid() == 0 else (os.getuid(), os.getgid())

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _COMPOSE_ENV}
        # An empty host port makes Docker pick a free one: stacks never collide on the host.
        env |= {"MINI_SCAN_IMAGE": self.image, "DATA_DIR": str(self.data_dir)}
        env |= {"PUBSUB_PORT": "", "PROMETHEUS_PORT": ""}
        uid, gid = self.owner
        env |= {"MINI_SCAN_UID": str(uid), "MINI_SCAN_GID": str(gid)}
        return env | self.variables

    def command(self, *args: str) -> list[str]:
        cmd = ["docker", "compose", "-f", str(COMPOSE_FILE), "--project-directory", str(ROOT)]
        cmd += ["-p", self.name]
        if self.env_file:
            cmd += ["--env-file", str(self.env_file)]
        for profile in self.profiles:
            cmd += ["--profile", profile]
        return [*cmd, *args]

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `docker compose ARGS` for this project; raise with its output if it fails."""
        result = subprocess.run(
            self.command(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(*args),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """`docker compose ps -a` as dicts (Name, Service, State, Health, ExitCode, ...)."""
        out = self.compose("ps", "-a", "--format", "json").stdout.strip()
        # Compose 2.21+ prints one object per line; earlier versions printed one array.
        rows = json.loads(out) if out.startswith("[") else [json.loads(x) for x in out.splitlines()]
        return [row for row in rows if service is None or row["Service"] == service]

    def healthy(self, service: str, count: int) -> bool:
        states = [c.get("Health") for c in self.containers(service)]
        return len(states) == count and all(state == "healthy" for state in states)

    def wait_healthy(self, service: str, count: int = 1, timeout: float = 90) -> None:
        assert wait_until(lambda: self.healthy(service, count), timeout=timeout, interval=1), (
            f"{count} healthy {service} expected\n{self.describe()}"
        )

    def port(self, service: str, port: int, index: int = 1) -> str:
        """`host:port` where the container's port is published on the host."""
        out = self.compose("port", "--index", str(index), service, str(port)).stdout.strip()
        return out.splitlines()[-1]

    def log_lines(self, *services: str) -> list[tuple[str, str]]:
        """(container, line) for every log line of the services' containers."""
        out = self.compose("logs", "--no-color", *services).stdout
        return [(m["container"], m["line"]) for m in map(_LOG_LINE.match, out.splitlines()) if m]

    def describe(self) -> str:
        """What the stack looks like now, for assertion messages."""
        states = [
            f"{c['Name']}: {c['State']} {c.get('Health', '')} exit {c.get('ExitCode')}"
            for c in self.containers()
        ]
        logs = self.compose("logs", "--no-color", "--tail", "15").stdout
        return "\n".join(states) + "\n" + logs[-6000:]

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "20")


# --- what the processors did, from their logs ---------------------------------------------------


def committed_per_container(lines: Iterable[tuple[str, str]]) -> dict[str, list[int]]:
    """The message count of every `batch_committed` line, per container."""
    sizes: dict[str, list[int]] = {}
    for container, line in lines:
        event = json_line(line)
        if event and event.get("event") == "batch_committed":
            sizes.setdefault(container, []).append(event["messages"])
    return sizes


def json_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --- the oracle, from the scanner's --log lines -------------------------------------------------


@dataclass
class ScannerLog:
    """What a `mini-scan scan --log` run published: the table it must give, its dead letters."""

    lines: list[dict[str, Any]]

    @classmethod
    def parse(cls, text: str) -> ScannerLog:
        return cls([event for line in text.splitlines() if (event := json_line(line))])

    def expected_rows(self) -> list[Row]:
        fields = Observation._fields
        return expected_rows(
            Observation(**{f: line[f] for f in fields}) for line in self.lines if "ip" in line
        )

    def expected_dead_letters(self) -> dict[str, str]:
        """message id -> the reason its dead letter must carry."""
        return {line["message_id"]: line["reason"] for line in self.lines if "reason" in line}


def rows_from_json_lines(text: str) -> list[Row]:
    """`mini-scan services --json` output in the oracle's shape."""
    rows = []
    for line in text.splitlines():
        if (row := json_line(line)) is not None:
            last, first = (
                dt.datetime.fromisoformat(row[k]) for k in ("last_scanned", "first_seen")
            )
            rows.append((row["ip"], row["port"], row["service"], last, row["response"], first))
    return sorted(rows)


def http_get(address: str, path: str) -> bytes:
    """The body of `GET http://ADDRESS/PATH` (an error status raises)."""
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as response:
        return response.read()
