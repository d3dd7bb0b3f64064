"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (PyPI's kubernetes-validate, strict:
an unknown field is an error), the kustomization names every manifest, and the Compose file passes Debian's
`docker-compose config`; every sandboxd command line in them parses with sandboxd's own CLI (a flag renamed
breaks this test, not a deployment)."""

from __future__ import annotations

import copy
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sandboxd.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.31"


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _sandboxd_args(container: dict[str, Any]) -> list[str]:
    """The sandboxd arguments a container runs (its args, or what its `sh -c` execs)."""
    if container.get("command", [None])[0] == "sh":
        line = container["args"][0].replace("exec ", "", 1)
        return shlex.split(line.replace('"', ""))[1:]
    return list(container.get("args", []))


def test_the_kubernetes_manifests_are_valid_and_complete() -> None:
    manifests = _manifests()
    kinds = set()
    for name, doc in manifests:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "sandboxd", name
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "DaemonSet", "StatefulSet", "ConfigMap"} <= kinds
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    # the validation can fail: an unknown field is refused
    deployment = next(doc for _, doc in manifests if doc["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    # the scrape configuration is YAML Prometheus reads
    prometheus = next(doc for _, doc in manifests if doc["kind"] == "ConfigMap")
    scrape = yaml.safe_load(prometheus["data"]["sandboxd.yml"])
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"


def test_every_command_line_in_deploy_parses() -> None:
    parser = build_parser()
    lines = []
    for _, doc in _manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            if container["image"] == "sandboxd":
                lines.append(_sandboxd_args(container))
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if service["image"].startswith("sandboxd"):
            command = service["command"]
            lines.append(shlex.split(command) if isinstance(command, str) else list(command))
    assert len(lines) == 5  # (the replica and the node on Kubernetes; two nodes and a replica in Compose)
    for argv in lines:
        args = parser.parse_args(argv)
        assert args.command == "serve" and args.role in ("api", "node"), argv


def test_the_compose_file_is_valid() -> None:
    compose = DEPLOY / "compose" / "docker-compose.yml"
    done = subprocess.run(["docker-compose", "-f", str(compose), "config", "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    broken = compose.read_text().replace("restart: unless-stopped", "restart: [not, a, policy]", 1)
    tmp = compose.with_name(".broken-compose.yml")
    try:
        tmp.write_text(broken)
        done = subprocess.run(["docker-compose", "-f", str(tmp), "config", "-q"], capture_output=True, text=True)
        assert done.returncode != 0  # (the check can fail)
    finally:
        tmp.unlink(missing_ok=True)
