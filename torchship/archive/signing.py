"""Signed archives: `torchship archive --sign KEY` signs each archive's checksum listing with an ed25519 key, and a
server with a verify key configured refuses any archive that is unsigned, signed by another key, or changed after
signing — before any of its code or weights is loaded.

What is signed: `torchship-checksums.json`, the listing of every entry's sha256 that `write_archive` puts in each
archive; the signature travels beside it as `torchship-signature.json` (not listed: the listing cannot contain its own
signature). Verifying checks the signature over the listing's bytes, then every entry against the listing, and that
the archive holds no entry the listing leaves out, so one valid signature covers every byte the server will read.

Where: in the launcher and the Ray app, not in the handler. TorchServe imports the handler from the archive itself,
so code inside an archive cannot vouch for that archive; `torchship serve torchserve` verifies the whole store before
TorchServe starts, and the Ray app verifies each archive before it unpacks it (in the app builder and again in the
replica). Keys: PEM files (`openssl genpkey -algorithm ed25519 -out signing.pem`, `openssl pkey -in signing.pem
-pubout -out verify.pem`); only their path and a key id (sha256 of the public key, 16 hex digits) are ever printed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from torchship.archive.mar import MarArchive, checksum_listing, write_archive
from torchship.errors import ArchiveError, SignatureRefused
from torchship.handlers.names import CHECKSUMS_FILE, SIGNATURE_FILE, VERIFY_KEY_ENV

ALGORITHM = "ed25519"
_MAKE_KEYS = (
    "make one with `openssl genpkey -algorithm ed25519 -out signing.pem` (verify key: `openssl pkey -in signing.pem -pubout`)"
)


def _pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ArchiveError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_pem(path, "signing key"), password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ArchiveError(f"{path} is not an unencrypted ed25519 private key in PEM; {_MAKE_KEYS}")
    return key


def load_verify_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_pem(path, "verify key"))
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise ArchiveError(f"{path} is not an ed25519 public key in PEM; {_MAKE_KEYS}")
    return key


def verify_key_from(path: str | Path | None, environ: Mapping[str, str] = os.environ) -> Ed25519PublicKey | None:
    """The verify key named by `path`, else by TORCHSHIP_VERIFY_KEY_FILE; None when neither is set."""
    chosen = path or environ.get(VERIFY_KEY_ENV, "").strip()
    return load_verify_key(Path(chosen)) if chosen else None


def write_key_pair(folder: Path, name: str = "signing") -> tuple[Path, Path]:
    """A fresh ed25519 pair as PEM files, as openssl writes them: (folder/NAME.pem private, folder/NAME.pub.pem public).
    The private file is readable by its owner only."""
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.touch(mode=0o600)
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_archive(mar: Path, key: Ed25519PrivateKey) -> str:
    """Add the signature of `mar`'s checksum listing (rewriting the archive byte-reproducibly); returns the key id."""
    entries = dict(MarArchive(mar).entries)
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signed": CHECKSUMS_FILE,
        # The listing exactly as write_archive below stores it (the signature entry is never listed).
        "signature": base64.b64encode(key.sign(checksum_listing(entries))).decode("ascii"),
    }
    entries[SIGNATURE_FILE] = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")
    write_archive(entries, mar)
    return doc["key_id"]


def verify_archive(mar: Path, key: Ed25519PublicKey) -> None:
    """Raise SignatureRefused unless `mar` is signed by `key` and every entry is exactly what was signed."""
    name = Path(mar).name
    try:
        entries = MarArchive(Path(mar)).entries
    except (OSError, zipfile.BadZipFile) as exc:
        raise SignatureRefused(f"{name}: not a readable archive ({exc})") from None
    if SIGNATURE_FILE not in entries:
        raise SignatureRefused(f"{name}: not signed (no {SIGNATURE_FILE}); a verify key is configured, so only archives "
                               "signed with `torchship archive --sign` are served")  # fmt: skip
    try:
        doc = json.loads(entries[SIGNATURE_FILE])
        signature = base64.b64decode(doc["signature"], validate=True)
        signed_by = str(doc.get("key_id", "?"))
        algorithm = doc.get("algorithm")
    except (ValueError, KeyError, TypeError):
        raise SignatureRefused(f"{name}: {SIGNATURE_FILE} is malformed") from None
    if algorithm != ALGORITHM:
        raise SignatureRefused(f"{name}: signed with {algorithm!r}; only {ALGORITHM} is accepted")
    listing = entries.get(CHECKSUMS_FILE)
    if listing is None:
        raise SignatureRefused(f"{name}: no {CHECKSUMS_FILE} to check the signature against")
    try:
        key.verify(signature, listing)
    except InvalidSignature:
        raise SignatureRefused(
            f"{name}: the signature does not verify with the configured key (key id {key_id(key)}; the archive names "
            f"key id {signed_by}): signed by another key, or its checksum listing was changed after signing"
        ) from None
    try:
        expected = json.loads(listing)
    except ValueError:
        raise SignatureRefused(f"{name}: {CHECKSUMS_FILE} is not JSON") from None
    actual = {n for n in entries if n not in (CHECKSUMS_FILE, SIGNATURE_FILE)}
    problems = [f"{n} is not in the signed listing" for n in sorted(actual - set(expected))]
    problems += [f"{n} is missing" for n in sorted(set(expected) - actual)]
    problems += [f"{n} changed after signing (sha256 mismatch)" for n in sorted(actual & set(expected))
                 if hashlib.sha256(entries[n]).hexdigest() != expected[n]]  # fmt: skip
    if problems:
        raise SignatureRefused(f"{name}: {'; '.join(problems)}")


def verify_store(model_store: Path, key: Ed25519PublicKey) -> list[Path]:
    """Verify every archive of a store; SignatureRefused names each one refused, and why."""
    mars = sorted(Path(model_store).glob("*.mar"))
    refused = []
    for mar in mars:
        try:
            verify_archive(mar, key)
        except SignatureRefused as exc:
            refused.append(str(exc))
    if refused:
        raise SignatureRefused(f"{len(refused)} of {len(mars)} archives refused before loading:\n" + "\n".join(refused))
    return mars


def main(argv: list[str] | None = None) -> int:
    """`python -m torchship.archive.signing --model-store DIR --verify-key PEM`: verify a store, e.g. in an init container."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m torchship.archive.signing", description=main.__doc__)
    parser.add_argument("--model-store", default="model_store", help="folder of .mar files (default: model_store)")
    parser.add_argument("--verify-key", default=None, help=f"ed25519 public key, PEM (default: ${VERIFY_KEY_ENV})")
    args = parser.parse_args(argv)
    try:
        key = verify_key_from(args.verify_key)
        if key is None:
            raise ArchiveError(f"no verify key: pass --verify-key or set {VERIFY_KEY_ENV}")
        mars = verify_store(Path(args.model_store), key)
        if not mars:
            raise ArchiveError(f"no .mar files in {args.model_store}")
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(mars)} archives in {args.model_store} signed by key {key_id(key)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
