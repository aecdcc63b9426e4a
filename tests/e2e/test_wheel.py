"""torchship as users get it: the wheel, installed into a fresh virtual environment, run from a folder outside the
checkout whose own model package is named `models` (the name torchship itself once took).

The wheel is built from a copy of the working tree (nothing is written into the checkout). The fresh environment
takes torchship from the wheel only; its dependencies (torch, TorchServe, Ray, ...) come from the project's venv,
whose site-packages it lists as a plain path, so the project's editable install of the checkout is never run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from importlib.metadata import distribution
from pathlib import Path

import pytest

from tests.helpers import REPO, serve_command
from torchship.handlers.names import HANDLER_PACKAGE, LOAD_REFUSED_MARKER

#: A user's model package: named `models`, as most are.
USER_MODEL = """
import torch
from torch import nn

from torchship.spec import Dim, ModelSpec, TensorSpec


class UserMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build() -> UserMLP:
    torch.manual_seed(7)
    return UserMLP().eval()


SPEC = ModelSpec(
    name="user_mlp",
    version="1.0",
    description="a user's MLP in the user's own package `models`",
    factory=build,
    inputs=(TensorSpec("x", "FP32", (Dim("batch", min=1, max=16), 6)),),
    outputs=(TensorSpec("y", "FP32", (Dim("batch", min=1, max=16), 2)),),
    export_method="trace",
    formats=("torchscript", "pt2"),
)
"""
#: A package on PYTHONPATH with the archive's handler package name: it must never run in the archive's place.
DECOY = "raise SystemExit('the decoy handler package ran')\n"
#: Every file a command reads travels in the wheel.
PACKAGE_DATA = (
    "torchship/configs/config.properties",
    "torchship/configs/model-config.yaml",
    "torchship/configs/model-config.gpu.yaml",
    "torchship/configs/ray-serve.yaml",
    "torchship/engines/torchserve/torchserve_oip/torchship-oip.jar",
    "torchship/cpp/CMakeLists.txt",
    "torchship/cpp/tensor_io.cpp",
    "torchship/deploy/k8s/schemas/ray.io_rayservices_v1.json",
    "torchship/deploy/k8s/base/torchserve/deployment.yaml",
    "torchship/deploy/docker/torchserve.Dockerfile",
    "torchship/deploy/yamllint.yaml",
    "torchship/handlers/entry.py",
    "torchship/py.typed",
)


def _tracked_copy(dest: Path) -> Path:
    """The working tree's files (tracked, and new ones git does not ignore), links kept as links."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        src, out = REPO / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            out.symlink_to(src.readlink())
        else:
            shutil.copy2(src, out)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = _tracked_copy(tmp_path_factory.mktemp("tree") / "torchship")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(tree)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(out.glob("torchship-*.whl"))


def _console_scripts(dist: str, venv: Path) -> None:
    """The distribution's console scripts, written for venv's python (the distribution's code comes from the
    project's site-packages, listed in venv)."""
    for ep in distribution(dist).entry_points.select(group="console_scripts"):
        module, _, func = ep.value.partition(":")
        script = venv / "bin" / ep.name
        script.write_text(
            f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n", encoding="utf-8"
        )
        script.chmod(0o755)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    uv = Path(sys.executable).parent / "uv"
    subprocess.run(
        [str(uv), "pip", "install", "-q", "--offline", "--no-deps", "--python", str(root / "bin" / "python"), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    for dist in ("torchserve", "torch-model-archiver"):
        _console_scripts(dist, root)
    return root


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    user = tmp_path_factory.mktemp("user")
    (user / "models").mkdir()
    (user / "models" / "__init__.py").write_text("", encoding="utf-8")
    (user / "models" / "tiny.py").write_text(USER_MODEL, encoding="utf-8")
    return user


def _env(venv: Path, user: Path, *pythonpath: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (*pythonpath, user))
    return env


def _run(venv: Path, user: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(venv / "bin" / "torchship"), *args],
        cwd=user, env=_env(venv, user), capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"torchship {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_the_wheel_holds_one_import_package_and_everything_a_command_reads(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"torchship"}
    assert sorted(set(PACKAGE_DATA) - set(names)) == []
    # The repository's QA tooling stays in the repository.
    assert not [n for n in names if n.startswith(("torchship/bench/", "torchship/reliability/"))]


@pytest.fixture(scope="module")
def store(venv: Path, user_dir: Path) -> Path:
    """export --spec and archive, run from the user's folder with the installed torchship."""
    # The default endpoint pinned to TorchScript: endpoint names that do not depend on this machine's timings.
    exported = _run(venv, user_dir, "export", "--spec", "models.tiny:SPEC", "--default-format", "torchscript")
    assert "within tolerance" in exported.stdout, exported.stdout
    _run(venv, user_dir, "archive")
    assert sorted(p.name for p in (user_dir / "model_store").glob("*.mar")) == ["user_mlp.mar", "user_mlp_pt2.mar"]
    return user_dir / "model_store"


def test_the_installed_torchship_runs_from_the_users_folder(venv: Path, user_dir: Path) -> None:
    script = "import torchship, torchship.handlers.core as c; print(torchship.__file__); print(c.__file__)"
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script],
        cwd=user_dir, env=_env(venv, user_dir), capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert all(Path(line).is_relative_to(site / "torchship") for line in proc.stdout.split()), proc.stdout


@pytest.mark.parametrize("engine", ["torchserve", "ray"])
def test_serve_and_verify_a_users_model_from_outside_the_checkout(
    engine: str, venv: Path, user_dir: Path, store: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    with serve_command(
        engine, store, workdir=workdir, exe=venv / "bin" / "torchship", cwd=user_dir, env=_env(venv, user_dir)
    ) as server:
        url = re.search(r"ready at (http://\S+)", server.printed())
        assert url, server.printed()
        token = server.token()
        assert token, "both engines serve with an inference token here"
        verified = _run(venv, user_dir, "verify", "--engine", engine, "--url", url.group(1), "--token", token,
                        "--report", str(tmp_path / "verify.json"))  # fmt: skip
        rows = json.loads((tmp_path / "verify.json").read_text(encoding="utf-8"))["rows"]
        assert rows and all(r["passed"] for r in rows), verified.stdout
        assert {r["endpoint"] for r in rows} == {p.stem for p in store.glob("*.mar")}


def test_a_decoy_handler_package_on_pythonpath_is_refused(venv: Path, user_dir: Path, store: Path, tmp_path: Path) -> None:
    """TorchServe puts the caller's PYTHONPATH before the model directory: a package there with the archive's handler
    package name would run in its place. The archive's entry file finds it first and refuses the load."""
    decoy = tmp_path / "decoy"
    (decoy / HANDLER_PACKAGE).mkdir(parents=True)
    (decoy / HANDLER_PACKAGE / "__init__.py").write_text(DECOY, encoding="utf-8")
    (decoy / HANDLER_PACKAGE / "service.py").write_text(DECOY, encoding="utf-8")
    one = tmp_path / "store"
    one.mkdir()
    shutil.copyfile(store / "user_mlp.mar", one / "user_mlp.mar")
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [str(venv / "bin" / "torchship"), "serve", "torchserve", "--model-store", str(one), "--workdir", str(workdir),
         "--ready-timeout-s", "120"],
        cwd=user_dir, env=_env(venv, user_dir, decoy), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout
    assert LOAD_REFUSED_MARKER in proc.stderr, proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())  # rich wraps long lines
    assert f"the handler package {HANDLER_PACKAGE} was found in {decoy.resolve()}," in said, said[-3000:]
    log = "".join(p.read_text(encoding="utf-8", errors="replace") for p in workdir.rglob("*.log"))
    assert "the decoy handler package ran" not in log
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", leftover.stdout


@pytest.fixture(autouse=True)
def _no_checkout_on_path() -> Iterator[None]:
    """The user's commands run with the checkout nowhere on their path (only its venv's site-packages)."""
    assert str(REPO) not in os.environ.get("PYTHONPATH", "")
    yield


def test_migrate_from_the_users_folder_serves_a_foreign_archive_on_both_engines(
    venv: Path, user_dir: Path, store: Path, tmp_path: Path
) -> None:
    """The installed torchship, run where the user keeps a TorchServe archive of their own next to a torchship one."""
    from tests.foreign_store import FIXTURES, archive_foreign

    leaving = user_dir / "leaving"
    archive_foreign(leaving, "scale", str(FIXTURES / "scale_handler.py"), work=tmp_path)
    shutil.copyfile(store / "user_mlp.mar", leaving / "user_mlp.mar")
    requests_dir = user_dir / "requests" / "scale"
    requests_dir.mkdir(parents=True)
    (requests_dir / "a.txt").write_bytes(b"1 2")
    (requests_dir / "a.txt.headers.json").write_text(json.dumps({"X-Scale": "4"}), encoding="utf-8")
    proc = _run(venv, user_dir, "migrate", "--model-store", "leaving", "--requests", "requests", "--report", "migrate")
    report = json.loads((user_dir / "migrate" / "migrate.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["differences"] == 0, proc.stdout
    assert [(r["mode"], r["torchserve"]["status"], r["ray"]["status"]) for r in report["rows"]] == [
        ("one at a time", 201, 201),
        ("all at once", 201, 201),
    ]
    assert report["unsent"] == ["user_mlp"] and "not compared: user_mlp" in " ".join(proc.stderr.split())
