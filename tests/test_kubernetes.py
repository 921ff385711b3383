"""
Kubernetes: the kustomize layout under etc/kubernetes (base/agent,
base/server, four overlays) rendered with `kubectl kustomize`, every
rendered object validated offline against the Kubernetes schemas
(kubernetes-validate, strict), and the properties each overlay promises
asserted on the rendered objects: probes on the ports the environment
opens, secrets only from Secrets, a locked-down pod, Services and
NetworkPolicies that match the ports, memory requests above the idle RSS
measured here.

The renderer is kubectl's built-in kustomize (v4 or later; this machine's
kubectl 1.32 carries v5.5). Debian bookworm's kubernetes-client (kubectl
1.20, kustomize v2.0.3) is too old for `resources:` naming directories,
which every overlay uses.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from nova.agent.options import SETTINGS as AGENT_SETTINGS
from nova.agent.options import build_config as agent_config
from nova.config import ConfigError, Setting, resolve
from nova.server.options import SETTINGS as SERVER_SETTINGS
from nova.server.options import build_config as server_config

from .processes import (
    TOKEN,
    echo_roundtrip,
    fingerprint,
    free_port,
    novac,
    novas,
    postgres_server,
    rss_kib,
    target,
    wait_for,
)

# Every test here reads the overlays as `kubectl kustomize` renders them (a
# process), and three run NOVA itself: none belongs in the fast loop.
pytestmark = pytest.mark.integration

ROOT = Path(__file__).parent.parent
K8S = ROOT / "etc" / "kubernetes"
OVERLAYS = ("agent-single", "agent-ha", "server-single", "server-postgresql")
AGENT_OVERLAYS = ("agent-single", "agent-ha")
SERVER_OVERLAYS = ("server-single", "server-postgresql")
# The rendered overlays, kept for `kubectl apply -f` (seed Cases 2 and 3).
FLAT = {K8S / "novac-deployment.yaml": "agent-single", K8S / "novac-deployment-ha.yaml": "agent-ha"}

AGENT_ENVS = {s.env: s for s in AGENT_SETTINGS}
SERVER_ENVS = {s.env: s for s in SERVER_SETTINGS}
SOME_FINGERPRINT = "sha256:" + "ab" * 32
SOME_AUDIT_DB = "postgresql://nova:secret@postgres.example.internal:5432/nova"
IMAGE_UID = 10001  # the Dockerfile's USER (tests/test_deploy.py::test_dockerfile checks it there)

# Memory requests: at least this many times the idle RSS measured below.
HEADROOM = 1.5

Doc = dict[str, Any]


def _kustomize_sources() -> set[Path]:
    """Every file the kustomizations under etc/kubernetes name, and the kustomizations themselves."""
    seen: set[Path] = set()
    todo = [K8S / "overlays" / o for o in OVERLAYS]
    while todo:
        directory = todo.pop()
        k = directory / "kustomization.yaml"
        if k in seen:
            continue
        seen.add(k)
        spec = yaml.safe_load(k.read_text())
        names = list(spec.get("resources", [])) + [p["path"] for p in spec.get("patches", [])]
        for name in names:
            path = (directory / name).resolve()
            if path.is_dir():
                todo.append(path)
            else:
                seen.add(path)
    return seen


# Every file of the layout (tests/test_deploy.py requires each file in etc/ to be exercised).
SOURCES = sorted(_kustomize_sources())
FILES = {**{p: "test_kubernetes.py (rendered)" for p in SOURCES}, **{p: "test_kubernetes.py" for p in FLAT}}


def test_every_file_of_the_layout_is_used_by_an_overlay() -> None:
    on_disk = {p.resolve() for d in ("base", "overlays") for p in (K8S / d).rglob("*") if p.is_file()}
    assert on_disk == set(SOURCES), "a file under etc/kubernetes that no overlay uses (or a missing one)"
    assert {p.resolve() for p in K8S.glob("*") if p.is_file()} == {p.resolve() for p in FLAT}


# --- Rendering ---------------------------------------------------------------


def _kubectl() -> str:
    tool = shutil.which("kubectl")
    assert tool, (
        "kubectl (with kustomize v4 or later) is needed to render etc/kubernetes: the machine image carries"
        " it; elsewhere install kubectl >= 1.21"
    )
    done = subprocess.run([tool, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    version = json.loads(done.stdout).get("kustomizeVersion", "")
    m = re.match(r"v(\d+)\.", version)
    assert m and int(m.group(1)) >= 4, f"{tool} has kustomize {version or 'unknown'}; the overlays need v4 or later"
    return tool


def render(overlay: str | Path) -> list[Doc]:
    directory = overlay if isinstance(overlay, Path) else K8S / "overlays" / overlay
    done = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {directory}: {done.stderr}"
    # Deprecated fields print warnings: the layout uses none.
    assert done.stderr.strip() == "", done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {o: render(o) for o in OVERLAYS}


def _validator() -> Any:
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (a test extra) is not installed")


def _validation_error(doc: Doc) -> str | None:
    kv = _validator()
    try:
        kv.validate(doc, kv.latest_version(), strict=True)
    except kv.ValidationError as e:
        return str(e).splitlines()[0]
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_validates(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[overlay]
    assert docs
    for doc in docs:
        problem = _validation_error(doc)
        assert problem is None, f"{overlay} {doc['kind']}/{doc['metadata']['name']}: {problem}"
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))


def test_the_validator_catches_a_misspelled_field(rendered: dict[str, list[Doc]]) -> None:
    """So that a clean report above means something."""
    (deployment,) = _kind(rendered["agent-single"], "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    assert "readOnlyRootFs" in (_validation_error(broken) or "")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["replicas"] = "one"
    assert _validation_error(broken) is not None


@pytest.mark.parametrize("path", sorted(FLAT), ids=lambda p: p.name)
def test_the_flat_files_are_the_rendered_overlays(path: Path, rendered: dict[str, list[Doc]]) -> None:
    flat = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert flat == rendered[FLAT[path]], (
        f"{path.name} differs from overlays/{FLAT[path]}: regenerate it (see its header)"
    )


# --- Helpers -----------------------------------------------------------------


def _kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _workload(docs: list[Doc]) -> Doc:
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    return workload


def _container(docs: list[Doc]) -> Doc:
    (container,) = _workload(docs)["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def _side(overlay: str) -> tuple[str, dict[str, Setting[Any]]]:
    return ("NOVAC_", AGENT_ENVS) if overlay.startswith("agent") else ("NOVAS_", SERVER_ENVS)


def _env(container: Doc, pod_name: str) -> dict[str, str]:
    """The environment as the kubelet gives it: Secrets and the downward API filled in with stand-ins."""
    env: dict[str, str] = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = SOME_AUDIT_DB if item["name"] == "NOVAS_AUDIT_DB" else TOKEN + "-" + item["name"]
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod_name
    return env


def _port(container: Doc, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name_or_number]
    return port  # type: ignore[no-any-return]


def _mebibytes(quantity: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)?", str(quantity))
    assert m, quantity
    return float(m.group(1)) * {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, None: 1 / 2**20}[m.group(2)]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _agent_config(env: dict[str, str]) -> Any:
    # As shipped, the placeholder fingerprint is refused at start, naming the setting.
    with pytest.raises(ConfigError, match="NOVAC_TLS_FINGERPRINT"):
        agent_config(resolve(AGENT_SETTINGS, {}, env))
    return agent_config(resolve(AGENT_SETTINGS, {}, env | {"NOVAC_TLS_FINGERPRINT": SOME_FINGERPRINT}))


# --- Every overlay -----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_locked_down(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[overlay]
    pod = _workload(docs)["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == IMAGE_UID and psc["runAsGroup"] == IMAGE_UID
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True and sc.get("privileged", False) is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # Nothing from the node's file system; writable places are volumes of the pod's own.
    for volume in pod["volumes"]:
        kinds = set(volume) - {"name"}
        assert len(kinds) == 1 and kinds <= {"emptyDir", "persistentVolumeClaim", "secret"}, volume
    for item in container.get("env", []):
        assert "value" in item or "valueFrom" in item
    # The image's entry point is twist; the argument picks the side.
    assert container["args"] == ["novac" if overlay in AGENT_OVERLAYS else "novas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_come_from_secrets_never_a_literal(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    container = _container(rendered[overlay])
    prefix, settings = _side(overlay)
    items = {i["name"]: i for i in container["env"]}
    token = f"{prefix}TOKEN" if prefix == "NOVAC_" else "NOVAS_AGENT_TOKEN"
    assert token in items
    for name, item in items.items():
        if settings[name].secret or name == "NOVAS_AUDIT_DB":  # a database URL carries its password
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref["name"] and ref["key"] and "value" not in item, f"{overlay}: {name} is not from a Secret"
    assert not _kind(rendered[overlay], "Secret"), "no Secret (with a literal) is shipped"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_names_exist_and_are_a_valid_configuration(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    container = _container(rendered[overlay])
    prefix, settings = _side(overlay)
    names = [i["name"] for i in container["env"]]
    assert len(names) == len(set(names)), "a variable set twice"
    unknown = {n for n in names if n not in settings}
    assert not unknown, f"{overlay}: not {prefix}* settings: {sorted(unknown)}"
    env = _env(container, "nova-x-7d9f8c6b5-x2x4z")
    if prefix == "NOVAC_":
        config = _agent_config(env)
        assert config.servers and ("Env", "Production") in config.tags
    else:
        config = server_config(resolve(SERVER_SETTINGS, {}, env))
        assert config.tls and config.routes and config.admin_token


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_the_port_the_environment_opens(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    container = _container(rendered[overlay])
    env = _env(container, "nova-x-0")
    ready, alive = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz" and alive["path"] == "/healthz"
    assert ready["port"] == alive["port"]
    port = _port(container, ready["port"])
    if overlay in AGENT_OVERLAYS:
        config = _agent_config(env)
        assert config.health_port == port and config.health_bind == "0.0.0.0"
    else:
        config = server_config(resolve(SERVER_SETTINGS, {}, env))
        # The kubelet dials the pod's address: the admin port must listen there, behind its token.
        assert config.admin_port == port and config.admin_bind == "0.0.0.0" and config.admin_token
        assert _port(container, "agent") == config.agent_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_drain_finishes_within_the_grace_period(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    pod = _workload(rendered[overlay])["spec"]["template"]["spec"]
    prefix, _ = _side(overlay)
    drain = float(_env(pod["containers"][0], "x")[f"{prefix}DRAIN_TIMEOUT"])
    assert drain < pod["terminationGracePeriodSeconds"] <= drain + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_selects_the_pods_and_allows_only_named_ports(
    overlay: str, rendered: dict[str, list[Doc]]
) -> None:
    docs = rendered[overlay]
    labels = _workload(docs)["spec"]["template"]["metadata"]["labels"]
    container = _container(docs)
    policies = _kind(docs, "NetworkPolicy")
    assert policies
    for policy in policies:
        spec = policy["spec"]
        assert _selects(spec["podSelector"]["matchLabels"], labels)
        # No rule that allows everything: each names its peers and its ports.
        for rule in spec.get("ingress", []):
            assert rule.get("from") and rule.get("ports"), rule
        for rule in spec.get("egress", []):
            assert rule.get("to") and rule.get("ports"), rule
    # One policy closes both directions (what it does not allow is denied).
    assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} for p in policies)
    ingress = [r for p in policies for r in p["spec"].get("ingress", [])]
    for rule in ingress:
        for port in rule["ports"]:
            _port(container, port["port"])  # a port the container opens, by name


def _egress_ports(docs: list[Doc]) -> dict[int, list[Doc]]:
    """{port: [peers]} over every egress rule."""
    out: dict[int, list[Doc]] = {}
    for policy in _kind(docs, "NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            for port in rule["ports"]:
                out.setdefault(port["port"], []).extend(rule["to"])
    return out


def _is_cluster_dns(peer: Doc) -> bool:
    return peer == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }


# --- The agent -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", AGENT_OVERLAYS)
def test_agent_egress_is_the_servers_and_its_targets_only(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[overlay]
    config = _agent_config(_env(_container(docs), "x"))
    egress = _egress_ports(docs)
    assert all(_is_cluster_dns(peer) for peer in egress.pop(53))
    server_ports = {port for _, port in config.servers}
    assert server_ports == {9022} and set(egress) > server_ports
    target_ports = set(egress) - server_ports
    # The cluster's rule agrees with the agent's own (NOVAC_ALLOW): what the
    # NetworkPolicy lets out is what the policy allows, and a metadata address
    # stays denied by both (a decision here: no packet leaves).
    for port in target_ports:
        for peer in egress[port]:
            network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            for address in (network[1], network[-2]):
                assert config.policy.check_address(address, port).allowed, (address, port)
            assert not network.overlaps(ipaddress.ip_network("169.254.0.0/16"))
    assert not config.policy.check_address(ipaddress.ip_address("169.254.169.254"), 80).allowed
    # The server's example route (db.internal:5432) is a target the agent may reach.
    route_ports = {r.host_port for o in SERVER_OVERLAYS for r in _server_config(rendered[o]).routes}
    assert route_ports <= target_ports
    # Nothing dials in but the probe port.
    ingress = [r for p in _kind(docs, "NetworkPolicy") for r in p["spec"].get("ingress", [])]
    assert [p["port"] for r in ingress for p in r["ports"]] == ["health"]


def test_agent_single_mirrors_case_2(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["agent-single"]
    deployment = _workload(docs)
    assert deployment["kind"] == "Deployment" and deployment["spec"]["replicas"] == 1
    # One fixed name: the old and the new pod must not run at once.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "value" in {i["name"]: i for i in _container(docs)["env"]}["NOVAC_NAME"]
    # A budget on one replica could only block node drains.
    assert not _kind(docs, "PodDisruptionBudget")
    assert _container(docs)["resources"]["limits"] == {"memory": "512Mi", "cpu": "500m"}  # the seed's


def test_agent_ha_mirrors_case_3(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["agent-ha"]
    deployment = _workload(docs)
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    name = {i["name"]: i for i in _container(docs)["env"]}["NOVAC_NAME"]
    assert name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    labels = spec["template"]["metadata"]["labels"]
    assert _selects(spec["selector"]["matchLabels"], labels)
    pod = spec["template"]["spec"]
    hosts = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
    assert hosts and hosts[0]["maxSkew"] == 1 and hosts[0]["whenUnsatisfiable"] == "DoNotSchedule"
    assert _selects(hosts[0]["labelSelector"]["matchLabels"], labels)
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    (pdb,) = _kind(docs, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    # Keeps one agent, and still lets a drain proceed.
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]
    # Pod names are the agents' names: room for "-<hash>-<id>" (16) within NOVAC's 63.
    assert len(deployment["metadata"]["name"]) + 16 <= 63


# --- The server ----------------------------------------------------------------


def _server_config(docs: list[Doc]) -> Any:
    return server_config(resolve(SERVER_SETTINGS, {}, _env(_container(docs), "nova-novas-0")))


def _services(docs: list[Doc], labels: dict[str, str]) -> list[Doc]:
    return [s for s in _kind(docs, "Service") if _selects(s["spec"]["selector"], labels)]


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_services_match_the_ports(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[overlay]
    workload = _workload(docs)
    assert workload["kind"] == "StatefulSet"
    replicas = workload["spec"]["replicas"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    container = _container(docs)
    config = _server_config(docs)
    services = {s["metadata"]["name"]: s for s in _kind(docs, "Service")}
    # Every Service reaches a pod of this StatefulSet, on ports the container opens.
    for service in services.values():
        selector = dict(service["spec"]["selector"])
        pod_name = selector.pop("statefulset.kubernetes.io/pod-name", None)
        assert _selects(selector, labels)
        if pod_name is not None:
            assert pod_name in {f"{workload['metadata']['name']}-{i}" for i in range(replicas)}
        for port in service["spec"]["ports"]:
            _port(container, port["targetPort"])
    # The governing Service exists and is headless (one DNS name per server).
    governing = services[workload["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None"
    # Agents: on internal load balancers, on the agent port, keeping their source address.
    agents = [s for s in services.values() if s["spec"].get("type") == "LoadBalancer"]
    assert agents
    for service in agents:
        assert [_port(container, p["targetPort"]) for p in service["spec"]["ports"]] == [config.agent_port]
        assert service["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-internal"] == "true"
        assert service["spec"]["externalTrafficPolicy"] == "Local"
    # One balanced address for every replica: agents discover the members through it,
    # so every new connection is balanced on its own (nothing sticky).
    assert len(agents) == 1
    (balanced,) = agents
    assert "statefulset.kubernetes.io/pod-name" not in balanced["spec"]["selector"]
    assert balanced["spec"].get("sessionAffinity", "None") == "None"
    if replicas > 1:
        attributes = balanced["metadata"]["annotations"][
            "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"
        ]
        assert "stickiness.enabled=false" in attributes
    # Routes: one Service port per route, on the route's port, listening on the pod's address.
    (routes,) = [s for s in services.values() if "route" in s["metadata"]["name"]]
    assert routes["spec"]["type"] == "ClusterIP"
    assert sorted(p["port"] for p in routes["spec"]["ports"]) == sorted(r.port for r in config.routes)
    for port in routes["spec"]["ports"]:
        assert _port(container, port["targetPort"]) == port["port"]
    assert all(r.bind in ("0.0.0.0", "::") for r in config.routes)
    # The admin port: inside the cluster only.
    admin = [s for s in services.values() if any(p["targetPort"] == "admin" for p in s["spec"]["ports"])]
    assert admin and all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in admin)
    # Nothing else is published: only the agent port leaves the cluster.
    assert len(services) == len(agents) + len(admin) + 2  # + routes + governing


@pytest.mark.parametrize("overlay", SERVER_OVERLAYS)
def test_server_network_policy(overlay: str, rendered: dict[str, list[Doc]]) -> None:
    docs = rendered[overlay]
    ingress = [r for p in _kind(docs, "NetworkPolicy") for r in p["spec"].get("ingress", [])]
    by_port: dict[str, list[Doc]] = {}
    for rule in ingress:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    # Agents from their network (an address block), nothing else on that port.
    assert by_port["agent"] and all(set(peer) == {"ipBlock"} for peer in by_port["agent"])
    # The admin port from this namespace's pods only: no other namespace, no address block.
    assert by_port["admin"] == [{"podSelector": {}}]
    # Routes from the pods labelled as their users.
    for name in [p for p in by_port if p.startswith("route-")]:
        assert all(set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"] for peer in by_port[name])
    assert set(by_port) == {"agent", "admin"} | {p["name"] for p in _container(docs)["ports"] if "route" in p["name"]}
    # NOVAS dials nothing but DNS (and its audit database).
    egress = _egress_ports(docs)
    assert all(_is_cluster_dns(peer) for peer in egress.pop(53))
    assert set(egress) == ({5432} if overlay == "server-postgresql" else set())


def test_server_single_keeps_its_state_on_a_claim(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["server-single"]
    workload = _workload(docs)
    assert workload["spec"]["replicas"] == 1
    pod = workload["spec"]["template"]["spec"]
    config = _server_config(docs)
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if PurePosixPath(m["mountPath"]) == config.state_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (claim,) = _kind(docs, "PersistentVolumeClaim")
    assert volume == {"name": mount["name"], "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # The self-signed certificate is generated there: no certificate setting.
    assert config.tls_cert is None and config.audit_db is None
    # The volume is writable by the image's user.
    assert pod["securityContext"]["fsGroup"] == IMAGE_UID
    assert not _kind(docs, "PodDisruptionBudget")


def test_server_postgresql_shares_the_audit_store_and_one_certificate(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["server-postgresql"]
    workload = _workload(docs)
    replicas = workload["spec"]["replicas"]
    assert replicas >= 2
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = _server_config(docs)
    assert config.audit_db == SOME_AUDIT_DB  # from the Secret (the secrets test checks the reference)
    # One certificate for every replica, from a Secret mounted read-only.
    assert config.tls_cert is not None and config.tls_key is not None
    assert config.tls_cert.parent == config.tls_key.parent
    (mount,) = [m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == config.tls_cert.parent]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] and volume["secret"]["defaultMode"] & 0o007 == 0
    # Nothing in the state directory is worth keeping then.
    assert not _kind(docs, "PersistentVolumeClaim")
    # Drains take one server at a time and are never blocked.
    (pdb,) = _kind(docs, "PodDisruptionBudget")
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert 1 <= pdb["spec"]["maxUnavailable"] < replicas
    hosts = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"]
    assert hosts and _selects(hosts[0]["labelSelector"]["matchLabels"], pod_labels)
    # How agents reach every replica is said where an operator reads it.
    text = (K8S / "overlays" / "server-postgresql" / "kustomization.yaml").read_text()
    assert "nova-novas-agents" in text and "every member" in text and "must not be sticky" in text


# --- Memory requests against the measured idle RSS ------------------------------


def _request_mib(docs: list[Doc]) -> float:
    return _mebibytes(_container(docs)["resources"]["requests"]["memory"])


@pytest.mark.integration
def test_memory_requests_cover_the_measured_idle_rss(tmp_path: Path, rendered: dict[str, list[Doc]]) -> None:
    """
    NOVAS (TLS with its generated certificate, the admin port, a route; the
    SQLite audit store, then PostgreSQL's) and NOVAC (registered, probe port
    on, an allow list) as the overlays configure them, idle: each overlay's
    memory request is at least HEADROOM times the RSS measured once the agent
    is registered and both answer their probes.
    """
    import urllib.request

    def probe(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def measure(server_env: dict[str, str], state: Path) -> tuple[float, float]:
        route = f"127.0.0.1:{free_port()}:db.internal:5432@Env=Production"
        with novas(state, [route], {"NOVAS_ADMIN_BIND": "0.0.0.0", **server_env}) as (server, port):
            health = free_port()
            env = {
                "NOVAC_SERVER": f"127.0.0.1:{port}",
                "NOVAC_TLS_FINGERPRINT": fingerprint(server),
                "NOVAC_HEALTH_PORT": str(health),
                "NOVAC_TAGS": "VPC=dev_infra;Env=Production",
                "NOVAC_ALLOW": "10.0.0.0/16",
            }
            with novac(state, env) as agent:
                server.wait_log("agent agent-1 registered")
                wait_for(lambda: probe(health) and probe(server.admin_port), 20, "both probes ready")
                return rss_kib(server.proc.pid) / 1024, rss_kib(agent.proc.pid) / 1024

    (tmp_path / "sqlite").mkdir()
    server_sqlite, agent_mib = measure({}, tmp_path / "sqlite")
    with postgres_server() as (pg_port, _):
        (tmp_path / "pg").mkdir()
        server_pg, agent_mib2 = measure(
            {"NOVAS_AUDIT_DB": f"postgresql://nova@127.0.0.1:{pg_port}/postgres"}, tmp_path / "pg"
        )
    idle = {
        "agent-single": max(agent_mib, agent_mib2),
        "agent-ha": max(agent_mib, agent_mib2),
        "server-single": server_sqlite,
        "server-postgresql": server_pg,
    }
    for overlay, mib in idle.items():
        assert mib > 16, f"{overlay}: an implausible RSS {mib:.1f} MiB"
        request = _request_mib(rendered[overlay])
        assert request >= HEADROOM * mib, f"{overlay}: requests {request:.0f} MiB, idle RSS {mib:.1f} MiB"
        limit = _mebibytes(_container(rendered[overlay])["resources"]["limits"]["memory"])
        assert limit >= 4 * request


# --- What the server overlays promise, on real processes -------------------------


def _state_mount(docs: list[Doc]) -> Doc:
    pod = _workload(docs)["spec"]["template"]["spec"]
    state_dir = _server_config(docs).state_dir
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if PurePosixPath(m["mountPath"]) == state_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume  # type: ignore[no-any-return]


@pytest.mark.integration
def test_server_single_a_new_pod_on_the_same_claim_keeps_the_fingerprint(
    tmp_path: Path, rendered: dict[str, list[Doc]]
) -> None:
    """
    server-single mounts a claim at NOVAS_STATE_DIR: a new pod finds the
    certificate the first one generated, and an agent pinned to it registers
    again. The same restart on an empty directory (what an emptyDir gives a
    new pod) presents another certificate, which the agent refuses: the
    claim is what keeps agents working across a restart.
    """
    assert "persistentVolumeClaim" in _state_mount(rendered["server-single"])
    claim = tmp_path / "claim"
    (tmp_path / "pod-1").mkdir()
    with novas(tmp_path / "pod-1", [], {"NOVAS_STATE_DIR": str(claim)}) as (server, _):
        pinned = fingerprint(server)
        assert "generated self-signed certificate" in server.text()
    for pod, state, same in (("pod-2", claim, True), ("pod-3", tmp_path / "empty-dir", False)):
        (tmp_path / pod).mkdir()
        with novas(tmp_path / pod, [], {"NOVAS_STATE_DIR": str(state)}) as (server, port):
            assert (fingerprint(server) == pinned) is same
            env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": pinned}
            with novac(tmp_path / pod, env) as agent:
                if same:
                    assert "using self-signed certificate" in server.text()
                    server.wait_log("agent agent-1 registered")
                else:
                    agent.wait_log("certificate verify failed")
                    assert "agent agent-1 registered" not in server.text()


@pytest.mark.integration
def test_server_postgresql_every_replica_serves_every_route_with_one_pinned_certificate(
    tmp_path: Path, rendered: dict[str, list[Doc]]
) -> None:
    """
    server-postgresql in miniature: two replicas with the one certificate of
    the TLS Secret, one agent that lists both (NOVAC_SERVER) and pins that
    certificate once; it registers with both, and a user connection through
    either replica's route reaches the target.
    """
    from cryptography import x509

    from nova.tls import certificate_fingerprint

    from .pki import CA

    docs = rendered["server-postgresql"]
    config = _server_config(docs)
    assert config.tls_cert is not None and _workload(docs)["spec"]["replicas"] == 2
    cert, key = CA().issue("novas").write(tmp_path, "tls")
    pinned = certificate_fingerprint(x509.load_pem_x509_certificate(cert.read_bytes()))
    secret = {"NOVAS_TLS_CERT": str(cert), "NOVAS_TLS_KEY": str(key)}
    routes = [free_port(), free_port()]
    (tmp_path / "nova-novas-0").mkdir()
    (tmp_path / "nova-novas-1").mkdir()
    with target("echo") as echo:
        with (
            novas(tmp_path / "nova-novas-0", [f"{routes[0]}:127.0.0.1:{echo}"], secret) as (s0, p0),
            novas(tmp_path / "nova-novas-1", [f"{routes[1]}:127.0.0.1:{echo}"], secret) as (s1, p1),
        ):
            env = {"NOVAC_SERVER": f"127.0.0.1:{p0},127.0.0.1:{p1}", "NOVAC_TLS_FINGERPRINT": pinned}
            with novac(tmp_path, env, name="nova-novac-7d9f8c6b5-x2x4z"):
                for server in (s0, s1):
                    server.wait_log("agent nova-novac-7d9f8c6b5-x2x4z registered")
                for port in routes:
                    assert echo_roundtrip(port, b"through either replica") == b"through either replica"
