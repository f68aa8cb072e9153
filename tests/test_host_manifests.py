"""The Kubernetes manifests and the systemd unit in deploy/, checked by the tools.

Kubernetes: every document validates against the API schemas that the
``kubernetes-validate`` package bundles (offline), strictly (no unknown
fields), and the objects fit together. systemd: ``systemd-analyze verify``
accepts the unit with no warning. Both stop-timeouts exceed gunicorn's
graceful timeout, so running streams finish before the process is killed.
"""

from __future__ import annotations

import copy
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hosts.servers import DEPLOY, REPO

KUBERNETES = DEPLOY / "kubernetes"
# The oldest release still supported upstream, and the newest bundled.
VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def by_kind() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in documents()}


def graceful_timeout() -> float:
    return runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))["graceful_timeout"]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    docs = documents()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "ConfigMap",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_an_invalid_manifest_is_refused() -> None:
    """The validation can fail: a misspelt field and a wrong type."""
    deployment = copy.deepcopy(by_kind()["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    deployment = copy.deepcopy(by_kind()["Deployment"])
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_manifests_fit_together() -> None:
    kinds = by_kind()
    deployment, service = kinds["Deployment"], kinds["Service"]
    hpa, config = kinds["HorizontalPodAutoscaler"], kinds["ConfigMap"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    # The model comes from a read-only volume, and the ConfigMap names it there.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    models = mounts["models"]
    assert models["readOnly"] and "persistentVolumeClaim" in volumes["models"]
    assert config["data"]["LLAMA_MODEL"].startswith(models["mountPath"] + "/")
    # One model copy per pod, on the cores it requested.
    assert config["data"]["WORKERS"] == "1"
    assert config["data"]["LLAMA_N_THREADS"] == str(
        container["resources"]["requests"]["cpu"]
    )
    assert container["resources"]["limits"]["memory"]
    # Streams finish before the pod is killed.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > graceful_timeout() + pause


def unit_for_verify(tmp_path: Path) -> Path:
    """The unit, instantiated, with its paths pointing at files that exist."""
    gunicorn = Path(sys.executable).parent / "gunicorn"
    text = (DEPLOY / "wsgi-llama@.service").read_text()
    for old, new in {
        "/srv/wsgi-llama/venv/bin/gunicorn": str(gunicorn),
        "/etc/wsgi-llama/wsgi-llama.env": str(DEPLOY / "wsgi-llama.env"),
        "/etc/wsgi-llama/gunicorn.conf.py": str(DEPLOY / "gunicorn.conf.py"),
        "WorkingDirectory=/srv/wsgi-llama": f"WorkingDirectory={REPO}",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "wsgi-llama@.service").write_text(text)
    instance = tmp_path / "wsgi-llama@8001.service"
    instance.symlink_to("wsgi-llama@.service")
    return instance


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture()
def systemd_analyze() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (package systemd)")


@pytest.mark.usefixtures("systemd_analyze")
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(unit_for_verify(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "wsgi-llama" not in output, output  # no warning about the unit


@pytest.mark.usefixtures("systemd_analyze")
def test_systemd_analyze_reports_a_broken_unit(tmp_path: Path) -> None:
    instance = unit_for_verify(tmp_path)
    template = tmp_path / "wsgi-llama@.service"
    template.write_text(
        template.read_text().replace("KillSignal=SIGTERM", "KillSignal=SIGTERMINATE")
    )
    result = verify(instance)
    assert "SIGTERMINATE" in result.stdout + result.stderr


def test_the_unit_stops_gracefully_after_gunicorn_does() -> None:
    unit = (DEPLOY / "wsgi-llama@.service").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in unit if "=" in line)
    assert settings["KillSignal"] == "SIGTERM"  # gunicorn's graceful stop
    assert float(settings["TimeoutStopSec"]) > graceful_timeout()
    assert settings["EnvironmentFile"] == "/etc/wsgi-llama/wsgi-llama.env"
    assert settings["RestartPreventExitStatus"] == "3"  # a bad setting
