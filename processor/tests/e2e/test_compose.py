"""The compose stack on a real Docker engine, driven by the commands users run: `docker compose up
--build`, `--scale processor=5`, `docker compose run --rm scanner scan ...`, `logs`, `port`, `kill`,
`stop`, and the `postgres` and `monitoring` profiles.

The repository's docker-compose.yml is used unchanged, each stack in a project of its own (its own
name, data directory, image tag and free host ports). Without an engine the tests skip with the
reason, except with CI=true, where they fail (.ci/run starts one with docker-offline).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from emulator.testing import IN_CI, wait_until
from processor.tests.helpers.chaos import (
    REPEATS_PER_KILL,
    covers,
    describe_difference,
    pull_dead_letters,
    repeated_letters,
    table_rows,
    unexpected_letters,
)
from processor.tests.helpers.compose import (
    ROOT,
    ScannerLog,
    Stack,
    committed_per_container,
    engine_problem,
    http_get,
    json_line,
    rows_from_json_lines,
)

# One worker takes every compose test (pytest-xdist's loadgroup): they build one image and run
# their stacks one after another.
pytestmark = [pytest.mark.compose, pytest.mark.timeout(600), pytest.mark.xdist_group("compose")]

PROCESSORS = 5
FOREIGN_UID = 4242  # owns the database a host user left in ./data before the stack started
DLQ_SUBSCRIPTION = "projects/test-project/subscriptions/scan-dlq-sub"
POSTGRES_ENV = ROOT / "deploy" / "compose" / "postgres.env"
# A seeded scanner run: every kind of message, every rejection reason, some keys seen many times.
# The rate spreads it over a few seconds, so a processor can be killed while it runs.
SCAN = ["--count", "6000", "--rate", "1500", "--seed", "20251129", "--keys", "400"]
SCAN += ["--duplicates", "0.2", "--out-of-order", "0.2", "--malformed", "0.05"]
# A trickle, as the stack's own scanner sends (1 msg/s) but shorter: Pub/Sub spreads messages
# over every open stream, so even then each processor must get some.
TRICKLE = ["--count", "100", "--rate", "20", "--seed", "1129", "--keys", "400"]
# A killed processor's messages come back when their lease ends (LEASE_SECONDS, 20 s).
CONVERGE_TIMEOUT = 120
PROCESSOR_NAMES = {f"processor-{index}" for index in range(1, PROCESSORS + 1)}


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image, built once with `docker compose build` and shared by every stack."""
    problem = engine_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} (CI=true: the compose tests must run)")
        pytest.skip(problem)
    tag = f"mini-scan:test-{RUN}"
    # Built in the first stack's project: compose labels the image with its project, so its
    # `up --build` then finds this very image instead of making a second one.
    Stack(project(1), ROOT / "data", tag).compose("build", "--quiet", timeout=900)
    yield tag
    subprocess.run(["docker", "image", "rm", tag], capture_output=True, check=False, timeout=60)


RUN = uuid.uuid4().hex[:8]


def project(number: int) -> str:
    return f"mini-scan-test-{RUN}-{number}"


def docker_inspect(name: str) -> dict:
    out = subprocess.run(
        ["docker", "inspect", name], capture_output=True, text=True, check=True, timeout=30
    )
    return json.loads(out.stdout)[0]


def run_scanner(stack: Stack, *args: str) -> subprocess.Popen[str]:
    """`docker compose run --rm scanner scan ARGS --log -`: its --log lines come on stdout."""
    return stack.popen("run", "--rm", "-T", "scanner", "scan", *args, "--log", "-")


def finished(scanner: subprocess.Popen[str]) -> ScannerLog:
    out, err = scanner.communicate(timeout=300)
    assert scanner.returncode == 0, err[-3000:]
    return ScannerLog.parse(out)


# --- `docker run`: the image alone ---------------------------------------------------------------


def test_the_image_holds_the_sources_it_was_built_from(image: str) -> None:
    script = (
        "import hashlib, pathlib, processor, scanner, emulator\n"
        "for package in (processor, scanner, emulator):\n"
        "    base = pathlib.Path(package.__file__).parent\n"
        "    for f in sorted(base.rglob('*.py')):\n"
        "        print(package.__name__ + '/' + str(f.relative_to(base)),"
        " hashlib.sha256(f.read_bytes()).hexdigest())\n"
    )
    result = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", image, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    in_image = dict(line.split() for line in result.stdout.splitlines())
    in_repo = {
        str(path.relative_to(ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()
        for package in ("processor", "scanner", "emulator")
        for path in sorted((ROOT / package).rglob("*.py"))
        if "tests" not in path.relative_to(ROOT).parts
    }

    assert in_image == in_repo


def test_the_emulator_role_is_healthy_under_plain_docker_run(image: str) -> None:
    name = f"{project(0)}-emulator"
    # The image's own HEALTHCHECK command, run every second instead of every ten.
    cmd = ["docker", "run", "-d", "--name", name, "--health-interval", "1s", image, "emulator"]
    subprocess.run(cmd, capture_output=True, check=True, timeout=60)
    try:
        assert wait_until(
            lambda: docker_inspect(name)["State"]["Health"]["Status"] == "healthy",
            timeout=60,
            interval=0.5,
        ), docker_inspect(name)["State"]
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False, timeout=60)


# --- `docker compose up --build` on SQLite, over a ./data someone else filled -------------------


@dataclass
class FirstRun:
    stack: Stack
    database: Path


def leave_a_foreign_database(data_dir: Path) -> Path:
    """A WAL database as a host user leaves it (-wal and -shm included), unreadable to others."""
    database = data_dir / "scan_results.db"
    code = (
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]);"
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE notes (x)');"
        "c.execute('INSERT INTO notes VALUES (1)'); c.commit(); os._exit(0)"  # keeps -wal, -shm
    )
    subprocess.run(["python3", "-c", code, str(database)], check=True, timeout=30)
    for path in [data_dir, *data_dir.iterdir()]:
        path.chmod(0o700 if path.is_dir() else 0o600)
        if os.geteuid() == 0:
            os.chown(path, FOREIGN_UID, FOREIGN_UID)
    return database


def row_count(database: Path) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as connection:
            return connection.execute("SELECT count(*) FROM services").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="class")
def first_run(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FirstRun]:
    data_dir = tmp_path_factory.mktemp("compose-sqlite")
    database = leave_a_foreign_database(data_dir)
    stack = Stack(project(1), data_dir, image)
    try:
        stack.compose("up", "-d", "--build", "--quiet-pull")
        yield FirstRun(stack, database)
    finally:
        stack.down()


class TestUpOverADataDirAnotherUserFilled:
    """`docker compose up --build` on SQLite, with a database already in ./data."""

    def test_up_starts_the_emulator_then_setup_then_writes_rows(self, first_run: FirstRun) -> None:
        stack = first_run.stack

        stack.wait_healthy("pubsub")
        assert wait_until(lambda: row_count(first_run.database) > 0, timeout=90, interval=1), (
            stack.describe()
        )
        [setup] = stack.containers("setup")
        assert (setup["State"], setup["ExitCode"]) == ("exited", 0)
        stack.wait_healthy("processor")
        stack.wait_healthy("scanner")

    def test_a_database_another_user_left_in_data_is_handed_to_the_processors_user_only(
        self, first_run: FirstRun
    ) -> None:
        assert wait_until(lambda: row_count(first_run.database) > 0, timeout=90, interval=1), (
            first_run.stack.describe()
        )
        uid, _ = first_run.stack.owner

        directory = first_run.database.parent
        assert (directory.stat().st_uid, stat.S_IMODE(directory.stat().st_mode)) == (uid, 0o700)
        for path in directory.glob("scan_results.db*"):
            info = path.stat()
            assert info.st_uid == uid, f"{path} is not the processors' user's"
            assert not stat.S_IMODE(info.st_mode) & 0o002, f"{path} is world-writable"
        with sqlite3.connect(first_run.database) as connection:
            assert connection.execute("SELECT x FROM notes").fetchall() == [(1,)]

    def test_every_role_writes_json_log_lines(self, first_run: FirstRun) -> None:
        stack = first_run.stack
        assert wait_until(lambda: row_count(first_run.database) > 0, timeout=90, interval=1)

        lines = stack.log_lines("pubsub", "data-dir", "setup", "scanner", "processor")

        containers = {container.rsplit("-", 1)[0] for container, _ in lines}
        assert containers == {"pubsub", "data-dir", "setup", "scanner", "processor"}
        not_json = [(c, line) for c, line in lines if json_line(line) is None]
        assert not not_json, not_json[:5]

    def test_every_container_is_hardened_and_publishes_on_the_loopback_only(
        self,
        first_run: FirstRun,
    ) -> None:
        for container in first_run.stack.containers():
            config = docker_inspect(container["Name"])
            host, name = config["HostConfig"], container["Service"]

            assert host["CapDrop"] == ["ALL"], name
            assert "no-new-privileges:true" in host["SecurityOpt"], name
            assert host["ReadonlyRootfs"], name
            if name == "data-dir":
                assert config["Config"]["User"] == "0:0"
                assert sorted(host["CapAdd"]) == ["CAP_CHOWN", "CAP_DAC_READ_SEARCH", "CAP_FOWNER"]
            else:
                uid, gid = first_run.stack.owner
                assert config["Config"]["User"] == f"{uid}:{gid}", name
                assert not host["CapAdd"], name
            for bindings in (host["PortBindings"] or {}).values():
                assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}, name


# --- five processors, a seeded scanner run, a kill, `stop`, and Prometheus ---------------------


@dataclass
class ScaledRun:
    stack: Stack
    database: Path
    published: list[ScannerLog] = field(default_factory=list)
    batches_before_burst: dict[str, int] = field(default_factory=dict)
    trickle_messages: dict[str, int] = field(default_factory=dict)
    killed: str = ""  # the container's full name
    killed_at: dt.datetime | None = None

    def expected_rows(self) -> list:
        return ScannerLog([line for log in self.published for line in log.lines]).expected_rows()


@pytest.fixture(scope="class")
def scaled(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaledRun]:
    data_dir = tmp_path_factory.mktemp("compose-scaled")
    stack = Stack(project(2), data_dir, image, profiles=["monitoring"])
    # No background scanner: the table must hold exactly what the seeded run published.
    up = ("up", "-d", f"--scale=processor={PROCESSORS}", "--scale=scanner=0")
    try:
        stack.compose(*up)
        stack.wait_healthy("processor", PROCESSORS)
        yield ScaledRun(stack, data_dir / "scan_results.db")
    finally:
        stack.down()


def processor_batches(stack: Stack) -> dict[str, int]:
    """How many batches each processor has committed so far."""
    return {name: len(sizes) for name, sizes in processor_commits(stack).items()}


def processor_commits(stack: Stack) -> dict[str, list[int]]:
    return committed_per_container(stack.log_lines("processor"))


@pytest.fixture(scope="class")
def trickle(scaled: ScaledRun) -> ScaledRun:
    """A slow seeded scanner run through compose, once its rows are all in the table."""
    stack = scaled.stack
    scaled.published.append(finished(run_scanner(stack, *TRICKLE)))
    url, expected = f"sqlite:///{scaled.database}", scaled.expected_rows()
    assert wait_until(lambda: table_rows(url) == expected, timeout=60, interval=1), (
        describe_difference(url, expected)
    )
    commits = processor_commits(stack)
    scaled.batches_before_burst = {name: len(sizes) for name, sizes in commits.items()}
    scaled.trickle_messages = {name: sum(sizes) for name, sizes in commits.items()}
    return scaled


@pytest.fixture(scope="class")
def seeded(trickle: ScaledRun) -> ScaledRun:
    """Then a fast seeded scanner run; one processor is killed (SIGKILL) once it has committed a
    batch of it, then started again with `up`. Returns when the scanner is done."""
    stack = trickle.stack
    victim = stack.containers("processor")[2]["Name"]
    prefix = victim.removeprefix(f"{stack.name}-")  # how `docker compose logs` names it
    before = trickle.batches_before_burst.get(prefix, 0)
    scanner = run_scanner(stack, *SCAN)
    assert wait_until(
        lambda: processor_batches(stack).get(prefix, 0) > before, timeout=60, interval=0.2
    ), f"{victim} committed nothing of the run before it was to be killed"
    # `docker compose kill` has no --index: one replica is killed by its container's name.
    subprocess.run(["docker", "kill", "--signal", "KILL", victim], check=True, timeout=60)
    trickle.killed, trickle.killed_at = victim, container_time(victim, "FinishedAt")
    stack.compose("up", "-d", f"--scale=processor={PROCESSORS}", "--scale=scanner=0")
    trickle.published.append(finished(scanner))
    return trickle


def container_time(name: str, field: str) -> dt.datetime:
    """A container's State.StartedAt or State.FinishedAt, from the engine's own clock."""
    text = subprocess.run(
        ["docker", "inspect", "--format", f"{{{{.State.{field}}}}}", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    # RFC 3339 with nanoseconds: fromisoformat takes up to microseconds.
    seconds, _, fraction = text.removesuffix("Z").partition(".")
    return dt.datetime.fromisoformat(f"{seconds}.{(fraction + '000000')[:6]}+00:00")


def rule_groups() -> list[str]:
    """The alert rule groups in deploy/prometheus/rules/, which the profile must load."""
    yaml = YAML(typ="safe")
    return [
        group["name"]
        for path in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
        for group in (yaml.load(path.read_text()) or {}).get("groups", [])
    ]


class TestFiveScaledProcessors:
    """`--scale processor=5` with the monitoring profile, two seeded runs, a kill, a stop."""

    def test_each_scaled_processor_serves_metrics_on_a_loopback_port(
        self, scaled: ScaledRun
    ) -> None:
        addresses = {
            scaled.stack.port("processor", 9100, index) for index in range(1, PROCESSORS + 1)
        }

        assert len(addresses) == PROCESSORS
        for address in addresses:
            assert address.startswith("127.0.0.1:")
            assert b"mini_scan_messages_received_total" in http_get(address, "/metrics")

    def test_prometheus_scrapes_every_scaled_processor_with_the_rules_loaded(
        self,
        scaled: ScaledRun,
    ) -> None:
        prometheus = scaled.stack.port("prometheus", 9090)

        def targets_up() -> list[str]:
            query = urllib.parse.urlencode({"query": 'up{job="mini-scan"} == 1'})
            result = json.loads(http_get(prometheus, f"/api/v1/query?{query}"))["data"]["result"]
            return sorted(sample["metric"]["instance"] for sample in result)

        assert wait_until(lambda: len(targets_up()) == PROCESSORS, timeout=60, interval=1), (
            targets_up()
        )
        loaded = json.loads(http_get(prometheus, "/api/v1/rules"))["data"]["groups"]
        assert sorted(group["name"] for group in loaded) == sorted(rule_groups())

    def test_a_seeded_run_through_compose_gives_the_oracle_table_despite_a_kill(
        self,
        seeded: ScaledRun,
    ) -> None:
        expected = seeded.expected_rows()
        url = f"sqlite:///{seeded.database}"

        assert wait_until(
            lambda: table_rows(url) == expected, timeout=CONVERGE_TIMEOUT, interval=1
        ), describe_difference(url, expected)
        # Started again after the kill, whether the engine restarted the container (its restart
        # policy) or `up` replaced it (a new container, logs and all).
        assert seeded.killed_at is not None
        assert container_time(seeded.killed, "StartedAt") > seeded.killed_at, (
            f"{seeded.killed} was not started again after it was killed"
        )

    def test_every_malformed_message_of_the_run_is_dead_lettered_with_its_reason(
        self, seeded: ScaledRun, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        expected = {
            k: v for log in seeded.published for k, v in log.expected_dead_letters().items()
        }
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", seeded.stack.port("pubsub", 8085))

        letters = pull_dead_letters(DLQ_SUBSCRIPTION, covers(expected), timeout=CONVERGE_TIMEOUT)

        assert len(expected) > 200
        assert set(expected) <= {letter.attributes["source_message_id"] for letter in letters}
        # One processor was SIGKILLed: a few of its dead letters may come twice, no more
        assert unexpected_letters(letters, expected, repeats=True) == {}
        assert repeated_letters(letters) <= REPEATS_PER_KILL

    def test_at_a_trickle_each_of_the_five_processors_gets_a_fair_share(
        self, trickle: ScaledRun
    ) -> None:
        # Pub/Sub spreads messages over every open stream; our emulator does it round robin, so
        # each processor (two streams each) gets a fifth. Half a fifth leaves room for a redelivery.
        fair_share = sum(trickle.trickle_messages.values()) / PROCESSORS

        assert trickle.trickle_messages.keys() == PROCESSOR_NAMES, trickle.trickle_messages
        assert min(trickle.trickle_messages.values()) >= fair_share / 2, trickle.trickle_messages

    def test_each_of_the_five_processors_committed_batches_of_the_fast_run(
        self, seeded: ScaledRun
    ) -> None:
        def committed_in_the_run() -> set[str]:
            before = seeded.batches_before_burst
            now = processor_batches(seeded.stack)
            return {name for name, count in now.items() if count > before.get(name, 0)}

        assert wait_until(lambda: committed_in_the_run() == PROCESSOR_NAMES, timeout=60), (
            processor_batches(seeded.stack),
            seeded.batches_before_burst,
        )

    def test_stop_lets_every_processor_exit_zero_within_its_grace_period(
        self, seeded: ScaledRun
    ) -> None:
        stack = seeded.stack
        stack.wait_healthy("processor", PROCESSORS)

        stack.compose("stop")

        # Compose sends SIGTERM, then SIGKILL after stop_grace_period: exit code 0, not 137.
        exits = {c["Name"]: (c["State"], c["ExitCode"]) for c in stack.containers("processor")}
        assert set(exits.values()) == {("exited", 0)}, exits
        assert len(exits) == PROCESSORS


# --- the postgres profile ------------------------------------------------------------------------


def test_the_postgres_profile_gives_the_same_oracle_table(
    image: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data_dir = tmp_path_factory.mktemp("compose-postgres")
    stack = Stack(project(3), data_dir, image, profiles=["postgres"], env_file=POSTGRES_ENV)
    try:
        # `up` returns once setup has created the subscription: publishing can start at once.
        stack.compose("up", "-d", "--scale=processor=2", "--scale=scanner=0")
        expected = finished(run_scanner(stack, *SCAN)).expected_rows()

        def stored() -> list:
            query = ("mini-scan", "services", "--json", "--sort", "ip", "--limit", "1000000")
            return rows_from_json_lines(stack.compose("exec", "-T", "processor", *query).stdout)

        assert wait_until(lambda: stored() == expected, timeout=CONVERGE_TIMEOUT, interval=1), (
            f"{len(stored())} rows, {len(expected)} expected\n{stack.describe()}"
        )
        # The migrate one-shot made the table as the owner; the processors hold only DML on it.
        sql = (
            "SELECT tableowner, (SELECT string_agg(privilege_type, ',' ORDER BY privilege_type) "
            "FROM information_schema.role_table_grants WHERE grantee = 'miniscan_app' "
            "AND table_name = 'services') FROM pg_tables WHERE tablename = 'services'"
        )
        psql = ("psql", "-U", "postgres", "-d", "scans", "-Atc", sql)
        owner = stack.compose("exec", "-T", "postgres", *psql).stdout.strip()
        assert owner == "miniscan_owner|INSERT,SELECT,UPDATE", stack.describe()
    finally:
        stack.down()
