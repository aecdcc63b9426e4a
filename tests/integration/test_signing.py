"""Signed archives: `torchship archive --sign`, and what a server with a verify key refuses before loading anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import unpack
from tests.helpers import run_cli
from torchship.archive.build import Endpoint
from torchship.archive.mar import MarArchive
from torchship.archive.signing import (
    load_signing_key,
    load_verify_key,
    sign_archive,
    verify_archive,
    verify_key_from,
    verify_store,
    write_key_pair,
)
from torchship.engines.ray.app import app as ray_app
from torchship.engines.torchserve.launcher import TorchServe
from torchship.errors import ArchiveError, EngineError, SignatureRefused
from torchship.handlers.core import verify_checksums
from torchship.handlers.names import CHECKSUMS_FILE, SIGNATURE_FILE
from torchship.reliability.run import signature_cases, signature_checks

ENDPOINT = "process_outputs"


@pytest.fixture
def signed(archives: dict[str, Endpoint], tmp_path: Path) -> tuple[Path, Path, Path]:
    """(signed copy of the endpoint's archive, its signing key, its verify key)."""
    private, public = write_key_pair(tmp_path)
    mar = tmp_path / "store" / f"{ENDPOINT}.mar"
    mar.parent.mkdir()
    shutil.copyfile(archives[ENDPOINT].mar, mar)
    sign_archive(mar, load_signing_key(private))
    return mar, private, public


def test_a_signed_archive_verifies_and_still_loads_as_before(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    mar, private, public = signed
    verify_archive(mar, load_verify_key(public))
    doc = json.loads(MarArchive(mar).read(SIGNATURE_FILE))
    assert doc["algorithm"] == "ed25519" and doc["signed"] == CHECKSUMS_FILE
    assert SIGNATURE_FILE not in MarArchive(mar).checksums  # the listing cannot list its own signature
    verify_checksums(unpack(mar, tmp_path / "unpacked"))  # the handler's own check is unchanged
    before = mar.read_bytes()
    sign_archive(mar, load_signing_key(private))
    assert mar.read_bytes() == before  # signing is deterministic: archives stay byte-reproducible


def test_every_way_an_archive_can_fail_is_refused(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    """Unsigned, another key, listing rewritten after signing, an entry changed or added after signing: each refused
    by the verifier with its reason; the signed control passes."""
    private, public = write_key_pair(tmp_path / "keys")
    key = load_verify_key(public)
    cases = signature_cases(archives[ENDPOINT].mar, tmp_path / "cases", private)
    verify_archive(cases.pop("signed"), key)
    expected = {
        "unsigned": "not signed",
        "signed by another key": "does not verify with the configured key",
        "listing rewritten after signing": "does not verify with the configured key",
        "entry changed after signing": "reference.pt changed after signing",
        "entry added after signing": "torchship_handler/sitecustomize.py is not in the signed listing",
    }
    assert set(cases) == set(expected)
    for case, mar in cases.items():
        with pytest.raises(SignatureRefused, match=expected[case]):
            verify_archive(mar, key)


def test_the_reliability_run_refuses_every_case_on_both_launchers_and_the_ray_app(
    archives: dict[str, Endpoint], tmp_path: Path
) -> None:
    """What `make reliability` records: every bad case refused by the TorchServe and Ray launchers (no process started)
    and by the Ray app's builder; the control accepted."""
    checks = signature_checks(archives[ENDPOINT].mar, tmp_path, lambda _line: None)
    assert {(c.case, c.checker) for c in checks if c.case != "signed"} == {
        (case, checker) for case in ("unsigned", "signed by another key", "listing rewritten after signing",
                                     "entry changed after signing", "entry added after signing")
        for checker in ("torchserve", "ray", "ray-app")
    }  # fmt: skip
    for c in checks:
        assert c.refused == (c.case != "signed"), c


def test_keys_are_checked_and_never_printed(tmp_path: Path) -> None:
    private, public = write_key_pair(tmp_path)
    with pytest.raises(ArchiveError, match="is not an ed25519 public key") as info:
        load_verify_key(private)
    assert private.read_text() not in str(info.value)
    with pytest.raises(ArchiveError, match="not an unencrypted ed25519 private key"):
        load_signing_key(public)
    assert verify_key_from(None, {}) is None
    assert verify_key_from(None, {"TORCHSHIP_VERIFY_KEY_FILE": str(public)}) is not None


def test_archive_sign_from_the_cli_and_verify_store(artifacts_dir: Path, tmp_path: Path) -> None:
    private, public = write_key_pair(tmp_path)
    store = tmp_path / "store"
    proc = run_cli("archive", ENDPOINT, "--artifacts", str(artifacts_dir), "--out", str(store), "--sign", str(private))
    assert "signed" in proc.stdout and private.read_text() not in proc.stdout + proc.stderr
    assert [p.name for p in verify_store(store, load_verify_key(public))] == [f"{ENDPOINT}.mar"]


def test_both_engines_refuse_an_unsigned_archive_before_loading(
    signed: tuple[Path, Path, Path], archives: dict[str, Endpoint], tmp_path: Path
) -> None:
    """TorchServe's launcher verifies the store before TorchServe starts (no process is launched); the Ray app's
    builder verifies before any deployment exists (what `serve deploy` and KubeRay run)."""
    mar, _private, public = signed
    store = mar.parent
    shutil.copyfile(archives["dynamic_router"].mar, store / "dynamic_router.mar")  # unsigned
    engine = TorchServe(store, tmp_path / "ts", verify_key=public)
    with pytest.raises(EngineError, match=r"1 of 2 archives refused before loading:\ndynamic_router.mar: not signed"):
        engine.start()
    assert engine.process is None
    with pytest.raises(SignatureRefused, match=r"dynamic_router\.mar: not signed"):
        ray_app({"model_store": str(store), "verify_key_file": str(public), "max_request_bytes": 1024})
