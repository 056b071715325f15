"""The Dockerfile and the pod spec: their rules, and the image's install and start steps run in a fresh venv."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import LISTENING, REPO

DOCKERFILE = REPO / "Dockerfile"
POD = REPO / "deploy" / "pod.yaml"


@dataclass
class Stage:
    """One FROM stage: its instructions as (keyword, argument text), in order."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [text for key, text in self.instructions if key == keyword]

    def env(self) -> dict[str, str]:
        """The ENV settings (KEY=VALUE form)."""
        return dict(pair.split("=", 1) for text in self.all("ENV") for pair in shlex.split(text))


def stages() -> list[Stage]:
    """The Dockerfile parsed into stages (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            result.append(Stage(rest.split()[0]))
        else:
            result[-1].instructions.append((keyword.upper(), rest.strip()))
    return result


def exec_form(text: str) -> list[str]:
    return json.loads(text)


def test_dockerfile_is_multi_stage_slim_non_root_and_checks_grpc_health() -> None:
    build, final = stages()
    assert build.base == final.base and final.base.endswith("-slim")
    (install,) = build.all("RUN")
    assert "'.[server,s3]'" in install and "[dev]" not in install  # the server and its S3 build lease only
    assert final.all("USER") == ["10001"]
    assert "useradd --create-home --uid 10001" in final.all("RUN")[0]
    env = final.env()
    assert {"SIGIL_FEED_PORT", "SIGIL_FEED_METRICS_PORT", "SIGIL_FEED_HOST", "SIGIL_FEED_CACHE"} <= set(env)
    assert final.all("EXPOSE") == [f"{env['SIGIL_FEED_PORT']} {env['SIGIL_FEED_METRICS_PORT']}"]
    healthcheck = final.all("HEALTHCHECK")[0]
    assert exec_form(healthcheck.split(" CMD ", 1)[1]) == ["sigil-feed", "health"]
    assert exec_form(final.all("ENTRYPOINT")[0]) == ["sigil-feed", "serve"]
    comments = DOCKERFILE.read_text()
    for variable in ("SIGIL_FEED_CONFIG", *env):
        if variable.startswith("SIGIL_FEED_"):
            assert f"#   {variable}" in comments, f"{variable} is not documented in the Dockerfile"


def test_pod_runs_sigil_feed_as_a_sidecar_with_grpc_probes_and_a_shared_cache() -> None:
    documents = {d["kind"]: d for d in yaml.safe_load_all(POD.read_text())}
    spec = documents["Pod"]["spec"]
    (sidecar,) = spec["initContainers"]
    (trainer,) = spec["containers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before the trainer, down after it
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    port = int(env["SIGIL_FEED_PORT"])
    assert sidecar["readinessProbe"]["grpc"]["port"] == port == sidecar["startupProbe"]["grpc"]["port"]
    assert {"cpu", "memory"} <= set(sidecar["resources"]["requests"]) and trainer["resources"]["requests"]
    cache = next(v["name"] for v in spec["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v)
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (sidecar, trainer)}
    assert mounts["sigil-feed"][cache] == env["SIGIL_FEED_CACHE"] and cache in mounts["trainer"]
    config = yaml.safe_load(documents["ConfigMap"]["data"]["trainer.yaml"])
    assert "token" not in config["server"]["auth"]  # the token comes from a Secret through the environment
    assert any(e["name"] == config["server"]["auth"]["token_env"] for e in sidecar["env"])
    assert f"127.0.0.1:{port}" in {e.get("value") for e in trainer["env"]}
    assert spec["terminationGracePeriodSeconds"] > config["server"]["grace_s"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_image_install_and_start_steps_work_in_a_fresh_venv(tmp_path: Path) -> None:
    build, final = stages()
    context = tmp_path / "src"
    context.mkdir()
    for copy in build.all("COPY"):
        *sources, _ = copy.split()
        for source in sources:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(origin, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy(origin, context / source)
    venv = tmp_path / "opt" / "venv"
    (install,) = build.all("RUN")
    command = install.replace("/opt/venv", str(venv)).replace("python -m venv", f"{sys.executable} -m venv", 1)
    subprocess.run(["bash", "-c", command], cwd=context, check=True, timeout=1500)

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SIGIL_FEED_", "PYTHON", "VIRTUAL_ENV"))},
           **final.env()}
    env.update(PATH=f"{venv / 'bin'}:{os.environ['PATH']}", SIGIL_FEED_HOST="127.0.0.1",
               SIGIL_FEED_PORT=str(free_port()), SIGIL_FEED_METRICS_PORT=str(free_port()),
               SIGIL_FEED_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"))
    server = subprocess.Popen(exec_form(final.all("ENTRYPOINT")[0]), cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.stdout is not None
        output = []
        for line in server.stdout:
            output.append(line)
            if LISTENING.search(line):
                break
        assert LISTENING.search(output[-1]), "".join(output)
        healthcheck = exec_form(final.all("HEALTHCHECK")[0].split(" CMD ", 1)[1])
        health = subprocess.run(healthcheck, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr
        peek = subprocess.run(["sigil-feed", "peek", "-n", "1"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert peek.returncode == 0 and "--- batch 0" in peek.stdout, peek.stderr
        metrics = f"http://127.0.0.1:{env['SIGIL_FEED_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(metrics, timeout=10) as response:
            assert "sigil_feed_batches_served_total" in response.read().decode()
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
