"""Signed archives: `torchship archive --sign`, and what a server with a verify key refuses before loading anything."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from archive.build import Endpoint
from archive.mar import MarArchive, write_archive
from archive.signing import load_signing_key, load_verify_key, sign_archive, verify_archive, verify_key_from, verify_store
from deploy.ray_app import app as ray_app
from engines.torchserve import TorchServe
from handlers.core import verify_checksums
from handlers.names import CHECKSUMS_FILE, SIGNATURE_FILE
from tests.conftest import unpack
from tests.helpers import run_cli, write_keys
from torchship.errors import ArchiveError, EngineError, SignatureRefused

ENDPOINT = "process_outputs"


@pytest.fixture
def signed(archives: dict[str, Endpoint], tmp_path: Path) -> tuple[Path, Path, Path]:
    """(signed copy of the endpoint's archive, its signing key, its verify key)."""
    private, public = write_keys(tmp_path)
    mar = tmp_path / "store" / f"{ENDPOINT}.mar"
    mar.parent.mkdir()
    shutil.copyfile(archives[ENDPOINT].mar, mar)
    sign_archive(mar, load_signing_key(private))
    return mar, private, public


def _rewrite(mar: Path, change: dict[str, bytes], *, relist: bool) -> None:
    """Change entries in place: with relist the checksum listing is recomputed (the signature entry kept as it was),
    without it only the bytes change."""
    with zipfile.ZipFile(mar) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    entries.update(change)
    if relist:
        write_archive(entries, mar)
        return
    tmp = mar.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    tmp.replace(mar)


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


def test_every_way_an_archive_can_fail_is_refused(
    signed: tuple[Path, Path, Path], archives: dict[str, Endpoint], tmp_path: Path
) -> None:
    mar, _private, public = signed
    key = load_verify_key(public)
    cases: dict[str, tuple[Path, str]] = {}

    unsigned = tmp_path / "unsigned.mar"
    shutil.copyfile(archives[ENDPOINT].mar, unsigned)
    cases["unsigned"] = (unsigned, "not signed")

    other_private, _ = write_keys(tmp_path, "other")
    other = tmp_path / "other.mar"
    shutil.copyfile(archives[ENDPOINT].mar, other)
    sign_archive(other, load_signing_key(other_private))
    cases["another key"] = (other, "does not verify with the configured key")

    relisted = tmp_path / "relisted.mar"
    shutil.copyfile(mar, relisted)
    _rewrite(relisted, {"reference.pt": b"swapped"}, relist=True)  # listing rewritten to match: signature breaks
    cases["listing rewritten after signing"] = (relisted, "does not verify with the configured key")

    changed = tmp_path / "changed.mar"
    shutil.copyfile(mar, changed)
    _rewrite(changed, {"reference.pt": b"swapped"}, relist=False)
    cases["entry changed"] = (changed, "reference.pt changed after signing")

    extra = tmp_path / "extra.mar"
    shutil.copyfile(mar, extra)
    _rewrite(extra, {"handlers/sitecustomize.py": b"print('hi')"}, relist=False)
    cases["entry added"] = (extra, "handlers/sitecustomize.py is not in the signed listing")

    for what, (path, expected) in cases.items():
        with pytest.raises(SignatureRefused, match=expected):
            verify_archive(path, key)
        print(what, "refused")


def test_keys_are_checked_and_never_printed(tmp_path: Path) -> None:
    private, public = write_keys(tmp_path)
    with pytest.raises(ArchiveError, match="is not an ed25519 public key") as info:
        load_verify_key(private)
    assert private.read_text() not in str(info.value)
    with pytest.raises(ArchiveError, match="not an unencrypted ed25519 private key"):
        load_signing_key(public)
    assert verify_key_from(None, {}) is None
    assert verify_key_from(None, {"TORCHSHIP_VERIFY_KEY_FILE": str(public)}) is not None


def test_archive_sign_from_the_cli_and_verify_store(artifacts_dir: Path, tmp_path: Path) -> None:
    private, public = write_keys(tmp_path)
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
