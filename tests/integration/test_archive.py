"""The .mar archives: reproducible, complete, and free of anything a stock TorchServe does not have."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import AOTI_MODEL, unpack
from torchship.archive.build import Endpoint, archive_models, endpoint_name, load_model_config
from torchship.archive.mar import MarArchive
from torchship.errors import ManifestError
from torchship.export.exporter import ModelExport
from torchship.handlers.names import HANDLER_ENTRY_FILE, HANDLER_PACKAGE, HANDLER_PACKAGE_FILES

#: What an archived handler may import: the standard library, torch, TorchServe's own package, the archive itself.
ALLOWED_TOP_LEVEL = set(sys.stdlib_module_names) | {"torch", "ts", "torchship_handler", "__future__"}


def test_every_usable_format_is_archived(archives: dict[str, Endpoint]) -> None:
    expected = {
        "simple_cnn", "simple_cnn_pt2", f"{AOTI_MODEL}_aoti", "dynamic_router", "dynamic_router_pt2",
        "seq_decoder", "seq_decoder_pt2", "process_outputs",
    }  # fmt: skip
    assert set(archives) == expected


def test_the_default_endpoint_serves_the_manifests_default_format(zoo_export: dict[str, ModelExport]) -> None:
    """<model> serves the format export chose; every other format keeps a name of its own."""
    formats = ("torchscript", "pt2", "aoti")
    manifest = zoo_export["simple_cnn"].manifest
    assert [endpoint_name(manifest, f) for f in formats] == ["simple_cnn", "simple_cnn_pt2", "simple_cnn_aoti"]
    aoti_default = manifest.model_copy(update={"default_format": "aoti"})
    assert [endpoint_name(aoti_default, f) for f in formats] == ["simple_cnn_ts", "simple_cnn_pt2", "simple_cnn"]


def test_archive_contents(archives: dict[str, Endpoint]) -> None:
    mar = MarArchive(archives["simple_cnn_pt2"].mar)
    names = set(mar.entries)
    mar_manifest, endpoint = mar.mar_manifest, mar.endpoint_doc
    assert {
        "MAR-INF/MANIFEST.json", "torchship_entry.py", "torchship_handler/__init__.py", "torchship_handler/codec.py",
        "torchship_handler/service.py",
        "manifest.json", "reference.pt", "endpoint.json", "model.pt2", "model-config.yaml", "process_outputs.torchscript.pt",
    } <= names  # fmt: skip
    assert mar_manifest["model"]["handler"] == "torchship_entry.py"
    assert mar_manifest["model"]["configFile"] == "model-config.yaml"
    assert endpoint == {"endpoint": "simple_cnn_pt2", "format": "pt2"}
    # What GET /v2/models/simple_cnn_pt2 answers on TorchServe (the OIP agent serves this entry as it is).
    assert json.loads(mar.entries["oip-metadata.json"]) == {
        "name": "simple_cnn_pt2",
        "versions": [mar.version],
        "platform": "pytorch_pt2",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }


def test_same_inputs_give_a_byte_identical_mar(archives: dict[str, Endpoint], artifacts_dir: Path, tmp_path: Path) -> None:
    rebuilt = archive_models(
        ["simple_cnn", "seq_decoder"], artifacts=artifacts_dir, out_dir=tmp_path, model_config=load_model_config()
    )
    assert len(rebuilt) == 5  # simple_cnn x3 (with AOTInductor), seq_decoder x2
    for e in rebuilt:
        assert e.mar.read_bytes() == archives[e.name].mar.read_bytes(), e.name


def test_archiving_refuses_an_artifact_changed_after_export(artifacts_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "artifacts"
    (copy / "dynamic_router").mkdir(parents=True)
    for f in (artifacts_dir / "dynamic_router").iterdir():
        (copy / "dynamic_router" / f.name).write_bytes(f.read_bytes())
    (copy / "dynamic_router" / "model.pt2").write_bytes(b"not the exported program")
    with pytest.raises(ManifestError, match="does not match the sha256"):
        archive_models([], artifacts=copy, out_dir=tmp_path / "store", model_config=load_model_config())


def _imports(source: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_archived_python_imports_only_stdlib_torch_and_ts(archives: dict[str, Endpoint]) -> None:
    entries = MarArchive(archives["simple_cnn"].mar).entries
    sources = {n: data.decode() for n, data in entries.items() if n.endswith(".py")}
    assert sorted(sources) == sorted([HANDLER_ENTRY_FILE, *(f"{HANDLER_PACKAGE}/{f}" for f in HANDLER_PACKAGE_FILES)])
    for name, source in sources.items():
        # Tracing imports OpenTelemetry only when an OTLP endpoint is configured (and serves untraced without it).
        allowed = ALLOWED_TOP_LEVEL | ({"opentelemetry"} if name == f"{HANDLER_PACKAGE}/tracing.py" else set())
        outside = _imports(source) - allowed
        assert not outside, f"{name} imports {sorted(outside)}"


def test_archived_handler_serves_with_torchship_unimportable(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    """Run the unpacked archive's handler in a fresh interpreter where torchship's own packages cannot be imported."""
    model_dir = unpack(archives["simple_cnn_pt2"].mar, tmp_path / "mar")
    script = textwrap.dedent(
        """
        import importlib.abc, json, sys
        from pathlib import Path
        BLOCKED = {"torchship", "models", "export", "deploy", "archive", "engines", "verify", "reliability", "bench",
                   "cpp", "pydantic", "yaml", "requests", "rich"}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        sys.path.insert(0, ".")
        import torch
        import torchship_entry
        from torchship_handler.codec import encode_request, decode_response

        class Ctx:
            system_properties = {"model_dir": ".", "gpu_id": None}
            def get_all_request_header(self, idx): return {}
            def set_response_status(self, code=200, phrase="", idx=0): raise SystemExit(f"status {code}: {phrase}")
            def set_response_header(self, idx, key, value): pass
            def set_response_content_type(self, idx, value): pass

        handler = torchship_entry.EndpointHandler()
        handler.initialize(Ctx())
        case = torch.load("reference.pt", weights_only=True)["cases"][0]
        body, _ = encode_request(case["inputs"])
        out = handler.handle([{"body": bytearray(body)}], Ctx())
        logits = decode_response(out[0])["outputs"]["logits"]
        assert torch.allclose(logits, case["outputs"]["logits"], atol=1e-5), "outputs differ"
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        # Where the handler's code came from: the archive's own folder, every module of it.
        origins = sorted({str(Path(sys.modules[m].__file__).resolve().parent) for m in sys.modules
                          if m.split(".")[0] == "torchship_handler"})
        print(json.dumps({"ok": True, "leaked": leaked, "origins": origins}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=model_dir, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "ok": True,
        "leaked": [],
        "origins": [str((model_dir / HANDLER_PACKAGE).resolve())],
    }
