"""Archive integrity in-process: a changed byte anywhere or a manifest sha256 that does not match is refused before
anything loads; nothing torchship reads from disk or the wire is unpickled."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import torchship
from tests.conftest import unpack
from tests.helpers import torchserve_context
from torchship.archive.build import Endpoint
from torchship.archive.mar import MarArchive, write_archive
from torchship.handlers.errors import ArtifactError
from torchship.handlers.names import CHECKSUMS_FILE
from torchship.handlers.service import TorchshipHandler
from torchship.reliability.run import PROJECT_CODE, python_files, tamper_byte, tamper_manifest, unpickling_calls, write_entries


def _initialize(mar: Path, dest: Path) -> TorchshipHandler:
    handler = TorchshipHandler()
    handler.initialize(torchserve_context(unpack(mar, dest)))
    return handler


def test_an_untouched_archive_loads(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    assert _initialize(archives["dynamic_router"].mar, tmp_path / "ok").initialized


def test_a_changed_model_byte_is_refused_by_the_checksums(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    bad = tamper_byte(archives["dynamic_router"].mar, tmp_path / "bad.mar")
    with pytest.raises(ArtifactError, match=r"model\.torchscript\.pt missing or changed .*sha256 mismatch"):
        _initialize(bad, tmp_path / "bad")


@pytest.mark.parametrize(
    "member", ["torchship_handler/codec.py", "endpoint.json", "model-config.yaml", "torchship_entry.py", "oip-metadata.json"]
)
def test_a_changed_byte_in_any_other_entry_is_refused(archives: dict[str, Endpoint], tmp_path: Path, member: str) -> None:
    members = dict(MarArchive(archives["simple_cnn_pt2"].mar).entries)
    members[member] = members[member] + b" "
    bad = write_entries(members, tmp_path / "bad.mar")  # the old listing kept, as a corrupted copy or hand edit leaves it
    with pytest.raises(ArtifactError, match=member.replace(".", r"\.")):
        _initialize(bad, tmp_path / "bad")


def test_a_manifest_sha256_that_does_not_match_is_refused(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    bad = tamper_manifest(archives["dynamic_router_pt2"].mar, tmp_path / "bad.mar")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        _initialize(bad, tmp_path / "bad")


def test_an_archive_without_its_checksums_is_refused(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    members = dict(MarArchive(archives["dynamic_router"].mar).entries)
    del members[CHECKSUMS_FILE]
    bad = write_entries(members, tmp_path / "bad.mar")
    with pytest.raises(ArtifactError, match="missing or unreadable"):
        _initialize(bad, tmp_path / "bad")


class _Payload:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "unpickled"))  # type: ignore[return-value]


def test_a_reference_file_carrying_a_pickled_object_is_refused_unexecuted(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    buf = io.BytesIO()
    torch.save({"cases": [_Payload(marker)]}, buf)
    members = dict(MarArchive(archives["dynamic_router"].mar).entries)
    members["reference.pt"] = buf.getvalue()
    bad = tmp_path / "pickled.mar"
    write_archive(members, bad)
    with pytest.raises(Exception, match=r"Weights only load failed|Unsupported global"):
        MarArchive(bad).references()
    assert not marker.exists()


def test_no_project_code_loads_a_pickle() -> None:
    # The scan covers the whole package, the folders linked into it (models, export, handlers, deploy) included.
    assert (Path(torchship.__file__).parent,) == PROJECT_CODE
    scanned = {f.relative_to(PROJECT_CODE[0]).parts[0] for f in python_files(PROJECT_CODE[0])}
    assert {"handlers", "export", "models", "deploy", "engines", "archive", "verify", "cli"} <= scanned, scanned
    assert unpickling_calls(PROJECT_CODE) == []


def test_the_pickle_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "import pickle\nimport torch\ntorch.load('a')\ntorch.load('b', weights_only=False)\ntorch.load('c', weights_only=True)\n"
    )
    found = unpickling_calls([tmp_path])
    assert len(found) == 3, found
