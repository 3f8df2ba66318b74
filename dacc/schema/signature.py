"""Optional ed25519 signatures: who compiled an artifact, not just whether it is intact.

The manifest's digest and file hashes are integrity only: anyone who edits an artifact can
recompute them. A signature over `manifest.json`'s exact bytes (which pin every other file by
sha256) ties the artifact to a private key; `dacc.load(path, trusted_keys=[...])` refuses an
artifact that is unsigned or signed by any other key, before it parses anything else.

`manifest.sig` is JSON: {"algorithm": "ed25519", "public_key": hex, "signature": hex}.
Keys: `dacc keygen NAME` writes NAME (private, PEM, mode 0600) and NAME.pub (hex public key).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Union

from dacc.schema.errors import DaccError

KeyLike = Union[str, bytes, os.PathLike]
_FIX = "ask the publisher for an artifact signed by a key you trust, or load it without trusted_keys"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a declared dependency
        raise DaccError("artifact signatures need the 'cryptography' package", None,
                        "pip install cryptography") from None
    return serialization, ed25519


def generate_keypair(path: str | Path) -> tuple[Path, Path]:
    serialization, ed25519 = _crypto()
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise DaccError(f"key file '{p}' already exists", str(p), "choose another name; dacc never overwrites keys")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_text(_public_hex(key.public_key()) + "\n")
    return path, pub


def _public_hex(public_key) -> str:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def fingerprint(public_hex: str) -> str:
    return f"ed25519:{public_hex[:16]}"


def sign_manifest(raw_manifest: bytes, private_key_path: str | Path) -> bytes:
    """The `manifest.sig` content for these manifest bytes."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(private_key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise DaccError(f"cannot read the signing key ({type(exc).__name__}: {str(exc)[:120]})",
                        str(private_key_path), "pass a key written by `dacc keygen`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DaccError("the signing key is not an ed25519 key", str(private_key_path),
                        "pass a key written by `dacc keygen`")
    return json.dumps({"algorithm": "ed25519", "public_key": _public_hex(key.public_key()),
                       "signature": key.sign(raw_manifest).hex()}, indent=1).encode()


def trusted_hex(keys: Iterable[KeyLike]) -> set[str]:
    """Public keys as hex: 32 raw bytes, 64 hex digits, or the path of a `.pub` file."""
    out = set()
    for k in keys:
        if isinstance(k, bytes) and len(k) == 32:
            out.add(k.hex())
            continue
        text = k.decode() if isinstance(k, bytes) else str(k)
        if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
            try:
                text = Path(text).read_text().strip()
            except OSError:
                raise DaccError(f"trusted key {str(k)[:80]!r} is neither a 64-digit hex key nor a readable .pub file",
                                None, "pass public keys written by `dacc keygen` (NAME.pub)") from None
        out.add(text.lower())
    return out


def verify_signature(raw_manifest: bytes, signature: bytes | None, trusted: set[str], where: str) -> str:
    """The signer's fingerprint, or a DaccError when the signature is missing, foreign or wrong."""
    _, ed25519 = _crypto()
    if signature is None:
        raise DaccError("the artifact is not signed, and trusted_keys were given", where, _FIX)
    try:
        sig = json.loads(signature)
        public, value = sig["public_key"], bytes.fromhex(sig["signature"])
        if sig.get("algorithm") != "ed25519" or not isinstance(public, str):
            raise ValueError("unknown algorithm")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DaccError("manifest.sig is malformed", where, _FIX) from None
    if public.lower() not in trusted:
        raise DaccError(f"the artifact is signed by {fingerprint(public)}, which is not a trusted key", where, _FIX)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(value, raw_manifest)
    except Exception:  # InvalidSignature, or a malformed key
        raise DaccError("the artifact's signature does not match its manifest (edited after signing)", where,
                        _FIX) from None
    return fingerprint(public)
