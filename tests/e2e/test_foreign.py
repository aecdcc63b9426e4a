"""Leaving TorchServe: archives made by the stock torch-model-archiver in the styles of TorchServe's own examples, served
by their own handlers on a real TorchServe and a real Ray Serve. `torchship migrate` must find every answer the same,
and exactly the changed answers when one handler changed between two builds; broken archives are refused with the
marker and one sentence on both engines while their neighbours serve."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import requests

from tests.foreign_store import FIXTURES, GOOD, archive_foreign, build_broken, build_good, write_requests
from tests.helpers import run_cli
from torchship.archive.foreign import oip_metadata
from torchship.archive.mar import MarArchive
from torchship.archive.signing import load_verify_key, verify_archive, write_key_pair
from torchship.engines.ray.launcher import RayServe, app_builder
from torchship.engines.ray.torchserve_worker import batch_error
from torchship.engines.torchserve.launcher import TorchServe
from torchship.handlers.errors import UnsafeArchive
from torchship.handlers.names import LOAD_REFUSED_MARKER, VERIFY_KEY_ENV


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model store, requests folder)."""
    root = tmp_path_factory.mktemp("foreign")
    build_good(root / "store", root / "work")
    return root / "store", write_requests(root / "requests")


@pytest.fixture(scope="module")
def signed(foreign: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a copy of the store with every foreign archive signed, the verify key)."""
    root = tmp_path_factory.mktemp("signed")
    private, public = write_key_pair(root / "keys")
    store = shutil.copytree(foreign[0], root / "store")
    mars = sorted(store.glob("*.mar"))
    signed = run_cli("sign", "--key", str(private), *map(str, mars))
    assert f"signed {len(mars)} archives" in signed.stdout
    for mar in mars:
        verify_archive(mar, load_verify_key(public))
        assert not MarArchive(mar).is_torchship
    refused = run_cli("sign", "--key", str(private), str(root / "missing.mar"), check=False)
    assert refused.returncode == 2 and "no such archive" in refused.stderr
    return store, public


def _migrate(tmp_path: Path, store: Path, reqs: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    report = tmp_path / "report"
    proc = run_cli("migrate", "--model-store", str(store), "--requests", str(reqs), "--report", str(report), *extra,
                   check=False, timeout_s=900, env=env)  # fmt: skip
    assert (report / "migrate.md").is_file(), proc.stdout + proc.stderr
    assert "torchserve: ready" in proc.stderr and "ray: ready" in proc.stderr, proc.stderr  # progress shown
    return proc.returncode, json.loads((report / "migrate.json").read_text())


def test_migrate_finds_every_answer_the_same_sequential_and_concurrent(
    foreign: tuple[Path, Path], signed: tuple[Path, Path], tmp_path: Path
) -> None:
    """Signed foreign archives, both engines configured to serve only archives signed by that key."""
    _store, reqs = foreign
    store, public = signed
    code, report = _migrate(tmp_path, store, reqs, env={VERIFY_KEY_ENV: str(public)})
    assert report["differences"] == 0, [r for r in report["rows"] if not r["same"]]
    assert code == 0 and report["passed"]
    rows = report["rows"]
    count = sum(1 for p in reqs.rglob("*") if p.is_file() and not p.name.endswith(".headers.json"))
    assert len(rows) == 2 * count and {r["mode"] for r in rows} == {"one at a time", "all at once"}
    assert {r["model"] for r in rows} == set(GOOD)
    by = {(r["model"], r["request"], r["mode"]): r for r in rows}
    # The handlers' own statuses and headers came through on both engines, not only 200s.
    for engine in ("torchserve", "ray"):
        scaled = by[("scale", "double.txt", "all at once")][engine]
        assert scaled["status"] == 201 and scaled["handler_headers"]["x-scaled-by"] == "2.0"
        assert scaled["handler_headers"]["content-type"] == "text/plain"
        assert by[("scale", "negative.txt", "one at a time")][engine]["status"] == 422
        assert all(by[("text", f"review{i}.txt", "all at once")][engine]["status"] == 200 for i in range(4))


def test_migrate_names_exactly_the_requests_a_changed_handler_answers_differently(
    foreign: tuple[Path, Path], tmp_path: Path
) -> None:
    """The same models rebuilt with one handler changed (negative scales now accepted), served on Ray Serve next to
    the original store on TorchServe: exactly that request differs, in both rounds, and migrate exits non-zero."""
    store, reqs = foreign
    changed = tmp_path / "scale_handler.py"
    source = (FIXTURES / "scale_handler.py").read_text(encoding="utf-8")
    assert "if scale < 0:" in source
    changed.write_text(source.replace("if scale < 0:", "if scale < -100:"), encoding="utf-8")
    rebuilt = tmp_path / "rebuilt"
    build_good(rebuilt, tmp_path / "work", scale_handler=changed)
    code, report = _migrate(tmp_path, store, reqs, "--ray-model-store", str(rebuilt))
    assert code != 0 and not report["passed"]
    differing = sorted((r["model"], r["request"], r["mode"]) for r in report["rows"] if not r["same"])
    assert differing == [("scale", "negative.txt", "all at once"), ("scale", "negative.txt", "one at a time")]
    assert all("status 422 on TorchServe, 201 on Ray Serve" in r["differences"][0] for r in report["rows"] if not r["same"])


@pytest.mark.parametrize("engine_class", [TorchServe, RayServe], ids=["torchserve", "ray"])
def test_broken_archives_are_refused_with_one_sentence_and_the_neighbours_serve(
    engine_class: type[TorchServe] | type[RayServe], foreign: tuple[Path, Path], tmp_path: Path
) -> None:
    store, _reqs = foreign
    mixed = tmp_path / "store"
    causes = build_broken(mixed, tmp_path / "work")
    for name in ("scale", "batched"):
        shutil.copy(store / f"{name}.mar", mixed)
    with engine_class(mixed, tmp_path / "run") as engine:
        assert sorted(engine.refused) == sorted(causes)
        for endpoint, words in causes.items():
            line = engine.refused[endpoint]
            assert line.startswith(f"{LOAD_REFUSED_MARKER} {endpoint}: ") and words in line, line
            assert "\n" not in line and "Traceback" not in line
        assert engine.endpoints == ["batched", "scale"]
        auth = engine.auth_headers()
        answer = requests.post(f"{engine.url}/predictions/scale", data=b"1 2", headers={**auth, "X-Scale": "3"}, timeout=30)
        assert (answer.status_code, answer.text, answer.headers["X-Scaled-By"]) == (201, "3 6", "3.0")
        # The versioned route, the OIP metadata a foreign archive gets, and a refused endpoint's 404, alike on both.
        row = {"values": [0.5] * 6}
        versioned = requests.post(f"{engine.url}/predictions/batched/2.0", json=row, headers=auth, timeout=30)
        assert versioned.status_code == 200 and len(versioned.json()["scores"]) == 4
        wrong = requests.post(f"{engine.url}/predictions/batched/1.0", json=row, headers=auth, timeout=30)
        assert wrong.status_code == 404 and "Model version: 1.0 does not exist for model: batched" in wrong.text
        metadata = requests.get(f"{engine.url}/v2/models/batched", headers=auth, timeout=30)
        assert metadata.status_code == 200 and metadata.json() == oip_metadata("batched", "2.0")
        ready = requests.get(f"{engine.url}/v2/models/scale/ready", headers=auth, timeout=30)
        assert ready.status_code == 200 and ready.json()["ready"] is True
        refused = requests.post(f"{engine.url}/predictions/raises", data=b"1", headers=auth, timeout=30)
        assert refused.status_code == 404
        # A handler that raises: TorchServe's status and JSON body for the failed batch, on both engines.
        failed = requests.post(f"{engine.url}/predictions/batched", data=b"not json", timeout=30,
                               headers={**auth, "Content-Type": "application/json"})  # fmt: skip
        assert (failed.status_code, failed.content) == (503, batch_error(503, "Prediction failed"))
        assert failed.headers["content-type"] == "application/json"


def test_a_foreign_archive_that_would_unpack_outside_its_folder_is_refused(foreign: tuple[Path, Path], tmp_path: Path) -> None:
    store, _reqs = foreign
    evil = tmp_path / "evil.mar"
    shutil.copy(store / "scale.mar", evil)
    with zipfile.ZipFile(evil, "a") as z:
        z.writestr("../escape.py", "raise SystemExit")
    with pytest.raises(UnsafeArchive, match=LOAD_REFUSED_MARKER):
        MarArchive(evil).unpack_cached(tmp_path / "cache")
    assert not (tmp_path / "escape.py").exists()


def test_the_rayservice_serve_config_builds_an_app_over_a_foreign_store(foreign: tuple[Path, Path], tmp_path: Path) -> None:
    """The RayService's serveConfigV2 is configs/ray-serve.yaml (deploy check holds them equal): its import path and
    args, on a store of foreign archives, give each archive a deployment that runs its own handler."""
    import yaml

    from torchship.engines.ray.app import ForeignDeployment
    from torchship.settings import config_file

    store, _reqs = foreign
    application = yaml.safe_load(config_file("ray-serve.yaml").read_text(encoding="utf-8"))["applications"][0]
    assert application["import_path"] == "torchship.engines.ray.app:app"
    built = app_builder(application["import_path"])({**application["args"], "model_store": str(store),
                                                     "cache_dir": str(tmp_path)})  # fmt: skip
    endpoints = built._bound_deployment.init_args[0]
    assert sorted(endpoints) == sorted(GOOD)
    assert all(d._bound_deployment.func_or_class is ForeignDeployment for d in endpoints.values())
    assert built._bound_deployment.init_kwargs["foreign"] == frozenset(GOOD)
    # A foreign archive's minWorkers sets its replicas (TorchServe starts that many workers); none: the app's default.
    three = tmp_path / "three"
    archive_foreign(three, "three", str(FIXTURES / "scale_handler.py"), work=tmp_path, config={"minWorkers": 3})
    shutil.copy(store / "scale.mar", three)
    built = app_builder(application["import_path"])({**application["args"], "model_store": str(three),
                                                     "cache_dir": str(tmp_path)})  # fmt: skip
    replicas = {name: d._bound_deployment.num_replicas for name, d in built._bound_deployment.init_args[0].items()}
    assert replicas == {"three": 3, "scale": application["args"].get("num_replicas", 1)}
