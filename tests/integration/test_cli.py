"""`torchship export` as a user runs it: user specs, refusals, bad input, and the AOTInductor package."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli
from torchship import __version__
from torchship.archive.mar import MarArchive
from torchship.cli import main
from torchship.export.exporter import ModelExport
from torchship.handlers.core import load_aoti
from torchship.manifest import read_manifest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "user_models"
USER_ENV = {"PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}


def test_version_names_torchship_and_what_it_serves_with() -> None:
    proc = run_cli("--version")
    line = proc.stdout.strip()
    assert "\n" not in line and line.startswith(f"torchship {__version__} ("), proc.stdout
    for package in ("torch", "torchserve", "ray"):
        assert f"{package} {version(package)}" in line, line


def test_exports_a_user_model_through_spec(tmp_path: Path, user_models: Path) -> None:
    proc = run_cli("export", "--spec", "my_pkg.my_module:SPEC", "--out", str(tmp_path), env=USER_ENV)
    assert "tiny_mlp" in proc.stdout and "within tolerance" in proc.stdout
    manifest = read_manifest(tmp_path / "tiny_mlp")
    assert manifest.version == "0.3"
    assert manifest.usable_formats() == ["torchscript", "pt2"]
    assert manifest.inputs[0].name == "features" and manifest.inputs[0].shape == [-1, 12]
    module = torch.jit.load(str(tmp_path / "tiny_mlp" / "model.torchscript.pt"))
    x = torch.randn(6, 12)
    from my_pkg.my_module import build_mlp

    with torch.no_grad():
        assert torch.allclose(module(x), build_mlp()(x), atol=1e-5)


def test_tracer_warning_refuses_the_trace_and_keeps_other_formats(tmp_path: Path, user_models: Path) -> None:
    proc = run_cli("export", "--spec", "my_pkg.my_module:BRANCHY_TRACE", "--out", str(tmp_path), env=USER_ENV, check=False)
    assert proc.returncode == 1
    assert "TracerWarning" in proc.stderr and "script it instead" in proc.stderr
    assert "Traceback" not in proc.stderr
    model_dir = tmp_path / "branchy"
    assert not (model_dir / "model.torchscript.pt").exists()
    manifest = read_manifest(model_dir)
    assert manifest.formats["torchscript"].status == "failed"
    assert manifest.usable_formats() == ["pt2"]  # the torch.where rewrite still exported


def test_parity_failure_prints_a_table_and_drops_the_file(
    tmp_path: Path, user_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["export", "--spec", "my_pkg.my_module:DRIFTING", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "drifting" in err and "pt2" in err and "outputs differ from eager" in err
    assert "max abs" in err and "FAIL:" in err
    assert not (tmp_path / "drifting" / "model.pt2").exists()
    manifest = read_manifest(tmp_path / "drifting")
    assert manifest.usable_formats() == ["torchscript"]
    failed = manifest.formats["pt2"]
    assert failed.status == "failed" and failed.parity and not any(p.passed for p in failed.parity)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spec", "no_such_pkg.models:SPEC"], "cannot import module 'no_such_pkg.models'"),
        (["--spec", "my_pkg.my_module:MISSING"], "has no attribute 'MISSING'"),
        (["--spec", "my_pkg.my_module:NOT_A_SPEC"], "not a torchship.spec.ModelSpec"),
        (["--spec", "my_pkg.my_module"], "must look like package.module:SPEC"),
        (["--spec", "my_pkg.my_module:BROKEN_FACTORY"], "factory raised RuntimeError: weights file missing"),
        (["no_such_model"], "unknown model(s) ['no_such_model']"),
    ],
)
def test_bad_specs_get_one_clear_error(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli("export", *args, "--out", str(tmp_path), env=USER_ENV, check=False)
    assert proc.returncode == 1
    assert message in " ".join(proc.stderr.split())  # rich may wrap long lines
    assert "Traceback" not in proc.stderr


def test_unwritable_output_folder_is_reported_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli("export", "dynamic_router", "--out", str(blocker / "artifacts"), check=False)
    assert proc.returncode == 1
    assert "cannot write to the output folder" in proc.stderr and "--out" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_failing_model_leaves_earlier_artifacts_valid(tmp_path: Path) -> None:
    run_cli("export", "dynamic_router", "--out", str(tmp_path))
    before = (tmp_path / "dynamic_router" / "manifest.json").read_bytes()
    proc = run_cli("export", "--spec", "my_pkg.my_module:BROKEN_FACTORY", "--out", str(tmp_path), env=USER_ENV, check=False)
    assert proc.returncode == 1
    assert (tmp_path / "dynamic_router" / "manifest.json").read_bytes() == before
    read_manifest(tmp_path / "dynamic_router")  # every file still matches its sha256
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind


def test_models_lists_the_zoo() -> None:
    proc = run_cli("models")
    for name in ("simple_cnn", "dynamic_router", "seq_decoder", "process_outputs"):
        assert name in proc.stdout


@pytest.mark.slow
def test_aoti_package_for_simple_cnn_and_its_archives(zoo_export: dict[str, ModelExport], tmp_path: Path) -> None:
    """The Done-when command: `torchship export --aoti simple_cnn` (the session's export runs exactly that, into an
    empty folder: tests/conftest.py) builds a package that reproduces eager. Then `torchship archive simple_cnn`:
    the classifier's top-k post-processing comes with its own export, so no other model's folder is read."""
    model_dir, store = zoo_export["simple_cnn"].model_dir, tmp_path / "store"
    manifest = read_manifest(model_dir)
    assert manifest.usable_formats() == ["torchscript", "pt2", "aoti"]
    assert manifest.formats["aoti"].options == {"isa": "native"}
    runner = load_aoti(str(model_dir / "model.aoti.pt2"), torch.device("cpu"))
    reference = torch.load(model_dir / "reference.pt", weights_only=True)
    tol = json.loads((model_dir / "manifest.json").read_text())["tolerance"]["aoti"]
    for case in reference["cases"]:
        got = runner(case["inputs"]["x"])
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert torch.allclose(got, case["outputs"]["logits"], atol=tol["atol"], rtol=tol["rtol"])

    artifacts = tmp_path / "artifacts"  # simple_cnn alone: archive reads no other model's folder
    shutil.copytree(model_dir, artifacts / "simple_cnn")
    run_cli("archive", "simple_cnn", "--artifacts", str(artifacts), "--out", str(store))
    # <simple_cnn> serves the default format (pinned to TorchScript in the session's export); each other keeps its
    # own name.
    default = manifest.default_format
    others = {"torchscript": ["simple_cnn_pt2", "simple_cnn_aoti"], "pt2": ["simple_cnn_ts", "simple_cnn_aoti"],
              "aoti": ["simple_cnn_ts", "simple_cnn_pt2"]}[str(default)]  # fmt: skip
    assert sorted(p.name for p in store.glob("*.mar")) == sorted(["simple_cnn.mar", *(f"{o}.mar" for o in others)])
    assert MarArchive(store / "simple_cnn.mar").format == default
    for mar in store.glob("*.mar"):
        assert "process_outputs.torchscript.pt" in MarArchive(mar).entries


@pytest.mark.slow
def test_portable_aoti_package_is_built_for_avx2(tmp_path: Path) -> None:
    run_cli("export", "--aoti", "--aoti-isa", "avx2", "dynamic_router", "--out", str(tmp_path))
    manifest = read_manifest(tmp_path / "dynamic_router")
    assert manifest.formats["aoti"].usable and manifest.formats["aoti"].options == {"isa": "avx2"}
    import zipfile

    with zipfile.ZipFile(tmp_path / "dynamic_router" / "model.aoti.pt2") as package:
        sources = [package.read(n).decode() for n in package.namelist() if n.endswith("wrapper.cpp")]
    assert sources and all("-march=x86-64-v3" in s and "avx512" not in s.split("// Compile cmd")[-1] for s in sources)


def test_init_writes_the_settings_and_config_dir_makes_every_command_read_them(
    zoo_export: dict[str, ModelExport], artifacts_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "my-config"
    proc = run_cli("init", str(config))
    assert sorted(p.name for p in config.iterdir()) == [
        "config.properties", "model-config.gpu.yaml", "model-config.yaml", "ray-serve.yaml",
    ]  # fmt: skip
    assert "--config-dir" in proc.stdout
    again = run_cli("init", str(config), check=False)
    assert again.returncode == 2 and "pass --force" in again.stderr, again.stderr
    # The user's copy, edited, is what `archive` writes into the archive.
    model_config = config / "model-config.yaml"
    model_config.write_text(model_config.read_text().replace("batchSize: 8", "batchSize: 3"), encoding="utf-8")
    store = tmp_path / "s"
    run_cli("--config-dir", str(config), "archive", "dynamic_router", "--artifacts", str(artifacts_dir), "--out", str(store))
    archived = MarArchive(store / "dynamic_router.mar").entries["model-config.yaml"].decode()
    assert "batchSize: 3" in archived, archived
    # A settings file missing from the folder asked for is a clear error naming it, never a traceback.
    model_config.unlink()
    missing = run_cli("--config-dir", str(config), "archive", "dynamic_router", "--artifacts", str(artifacts_dir),
                      "--out", str(tmp_path / "t"), check=False)  # fmt: skip
    assert missing.returncode == 2, missing.stderr
    said = " ".join(missing.stderr.split())  # rich wraps long lines
    assert f"model-config.yaml is missing from the config folder {config}" in said, said
    assert "Traceback" not in missing.stderr
