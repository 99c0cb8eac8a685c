"""Signed provenance for generated images: C2PA manifests (``c2pa-python``, the CAI's c2pa-rs) in every PNG.

The manifest states how the image was made: one ``c2pa.created`` action with the IPTC digital source type
``trainedAlgorithmicMedia``, ``softwareAgent`` aigckit and its version, and as parameters the generation metadata
(model, run, prompt/class, seed, sampler, steps, guidance, ...). It is signed with ES256 by the key in the key
folder and bound to the file's bytes (a data hash over everything but the manifest), so any edit of a pixel or of
a metadata chunk after signing fails verification.

Key folder (``aigc keys init`` writes one for development; default ``$AIGC_HOME/keys``, or ``$AIGC_KEYS``)::

    c2pa-chain.pem     signing certificate + intermediate (PEM), what C2PA embeds in the manifest
    c2pa-signer.key    the signing key (PKCS#8 PEM, mode 0600)
    c2pa-root.pem      the root a verifier trusts (only a local test root here: nobody else trusts it)
    imagemark.key      the secret of the invisible watermark (aigckit.trust.imagemark), mode 0600

A real deployment needs a signing certificate issued under a root on the C2PA trust list (or the verifiers' own
list), its key in an HSM/KMS rather than a file, and a time-stamp authority (``ta_url``) so signatures outlive
the certificate. ``install()`` adds ``aigckit.image.io``'s hooks: every PNG written by ``save_png`` / ``encode_png``
is then watermarked and signed whenever a key folder exists (the CLI and the server call it at start).
"""

from __future__ import annotations

import datetime
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from aigckit import __version__
from aigckit.errors import AigcError

__all__ = ["KeyPaths", "keys_dir", "init_keys", "load_keys", "sign_png", "verify", "install", "DIGITAL_SOURCE_TYPE"]

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


@dataclass(frozen=True)
class KeyPaths:
    root: Path

    @property
    def chain(self) -> Path:
        return self.root / "c2pa-chain.pem"

    @property
    def signer_key(self) -> Path:
        return self.root / "c2pa-signer.key"

    @property
    def anchor(self) -> Path:
        return self.root / "c2pa-root.pem"

    @property
    def imagemark(self) -> Path:
        return self.root / "imagemark.key"

    def exists(self) -> bool:
        return self.chain.is_file() and self.signer_key.is_file()


def keys_dir(path: str | os.PathLike | None = None) -> KeyPaths:
    """The key folder: ``path``, else ``$AIGC_KEYS``, else ``$AIGC_HOME/keys``."""
    if path is None:
        path = os.environ.get("AIGC_KEYS")
    if path is None:
        from aigckit import store

        path = store.home() / "keys"
    return KeyPaths(Path(path).expanduser())


def _write_secret(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def init_keys(path: str | os.PathLike | None = None, *, force: bool = False, days: int = 365) -> KeyPaths:
    """A local TEST chain (root CA -> intermediate -> ES256 signer with the emailProtection EKU that C2PA accepts)
    and an image-watermark secret. For development only: the root is trusted by nobody but this machine."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    kp = keys_dir(path)
    if kp.exists() and not force:
        raise AigcError(f"keys already exist in {kp.root}; pass --force to replace them", param="force")
    kp.root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aigckit local test (not trusted)")])

    def cert(subject, key, issuer, issuer_key, ca: bool, path_len, valid_days: int):
        usage = dict(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                     data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                     encipher_only=False, decipher_only=False)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=valid_days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len), critical=True)
             .add_extension(x509.KeyUsage(**usage), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False))
        if not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    rk, ik, sk = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = cert(name("aigckit test root CA"), rk, name("aigckit test root CA"), rk, True, 1, days * 10)
    inter = cert(name("aigckit test intermediate CA"), ik, root.subject, rk, True, 0, days * 5)
    leaf = cert(name("aigckit test signer"), sk, inter.subject, ik, False, None, days)
    pem = serialization.Encoding.PEM
    kp.chain.write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    kp.anchor.write_bytes(root.public_bytes(pem))
    _write_secret(kp.signer_key, sk.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    _write_secret(kp.imagemark, os.urandom(32).hex().encode() + b"\n")
    return kp


def load_keys(path: str | os.PathLike | None = None) -> KeyPaths:
    kp = keys_dir(path)
    if not kp.exists():
        raise AigcError(f"no signing keys in {kp.root}: run `aigc keys init` (a local test chain) or point "
                        f"$AIGC_KEYS at a folder with c2pa-chain.pem and c2pa-signer.key", param="keys")
    return kp


def _json_safe(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def manifest_for(metadata: dict | None, title: str = "image.png") -> dict:
    params = {str(k): _json_safe(v) for k, v in (metadata or {}).items()}
    return {
        "claim_generator_info": [{"name": "aigckit", "version": __version__}],
        "title": title,
        "format": "image/png",
        "assertions": [{"label": "c2pa.actions", "data": {"actions": [{
            "action": "c2pa.created",
            "digitalSourceType": DIGITAL_SOURCE_TYPE,
            "softwareAgent": {"name": "aigckit", "version": __version__},
            "parameters": params,
        }]}}],
    }


def sign_png(data: bytes, metadata: dict | None = None, keys: KeyPaths | None = None, title: str = "image.png"
             ) -> bytes:
    """PNG bytes with a signed C2PA manifest embedded (a caBX chunk)."""
    import c2pa

    kp = keys or load_keys()
    info = c2pa.C2paSignerInfo(b"es256", kp.chain.read_bytes(), kp.signer_key.read_bytes(), None)
    src, dst = io.BytesIO(data), io.BytesIO()
    with c2pa.Signer.from_info(info) as signer, c2pa.Builder(json.dumps(manifest_for(metadata, title))) as b:
        b.sign(signer, "image/png", src, dst)
    return dst.getvalue()


def _trust_context(kp: KeyPaths | None):
    import c2pa

    if kp is None or not kp.anchor.is_file():
        return None
    return c2pa.Context.from_dict({"trust": {"trust_anchors": kp.anchor.read_text()},
                                   "verify": {"verify_trust": True}})


def verify(path: str | os.PathLike, keys: KeyPaths | None = None) -> dict:
    """The manifest of ``path`` and whether it holds: ``valid`` is True only for a manifest whose signature and
    data hash verify (no failure codes); ``trusted`` when the signer chains to the key folder's root. Also the
    invisible watermark, when the key folder has its secret."""
    import c2pa

    path = Path(path)
    if not path.is_file():
        raise AigcError(f"no such file: {path}", param="image")
    kp = keys if keys is not None else keys_dir()
    out: dict = {"file": str(path), "valid": False, "trusted": False, "state": None, "manifest": None,
                 "failures": []}
    data = path.read_bytes()
    fmt = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ("image/jpeg" if data[:2] == b"\xff\xd8" else None)
    try:
        ctx = _trust_context(kp if kp.root.is_dir() else None)
        with io.BytesIO(data) as f:
            reader = c2pa.Reader(fmt or "image/png", f, context=ctx) if ctx else c2pa.Reader(fmt or "image/png", f)
            report = json.loads(reader.json())
            state = reader.get_validation_state()
    except c2pa.C2paError as e:
        msg = str(e)
        out["state"] = "NoManifest" if "ManifestNotFound" in type(e).__name__ or "not found" in msg.lower() \
            else "Error"
        out["failures"].append({"code": type(e).__name__, "explanation": msg[:300]})
        report, state = None, out["state"]
    if report is not None:
        out["state"] = state
        active = report.get("manifests", {}).get(report.get("active_manifest"), {})
        actions = [a for asr in active.get("assertions", []) if asr.get("label", "").startswith("c2pa.actions")
                   for a in asr.get("data", {}).get("actions", [])]
        created = next((a for a in actions if a.get("action") == "c2pa.created"), None)
        failures = report.get("validation_results", {}).get("activeManifest", {}).get("failure", []) \
            or report.get("validation_status", [])
        # signingCredential.untrusted alone is not tampering: it only says the root is not ours
        out["failures"] = [{"code": f.get("code"), "explanation": f.get("explanation")} for f in failures]
        hard = [f for f in out["failures"] if f["code"] != "signingCredential.untrusted"]
        out["valid"] = not hard
        out["trusted"] = state == "Trusted"
        out["manifest"] = {
            "label": report.get("active_manifest"),
            "claim_generator": active.get("claim_generator_info"),
            "signer": active.get("signature_info"),
            "action": created.get("action") if created else None,
            "digital_source_type": created.get("digitalSourceType") if created else None,
            "software_agent": created.get("softwareAgent") if created else None,
            "parameters": created.get("parameters") if created else None,
        }
    if kp.imagemark.is_file():
        from aigckit.trust.imagemark import decode_file

        try:
            out["watermark"] = decode_file(path, kp.imagemark.read_text().strip())
        except OSError as e:  # pixels that no longer decode (e.g. a tampered IDAT chunk): no mark can be read
            out["watermark"] = {"found": False, "error": f"the image data does not decode: {e}"}
            out["valid"] = False
    return out


# ------------------------------------------------------------------------------------------------ PNG hooks


def _pixel_hook(image, metadata: dict):
    kp = keys_dir()
    if not kp.imagemark.is_file():
        return image
    from aigckit.trust.imagemark import embed_image, payload_for

    secret = kp.imagemark.read_text().strip()
    payload = payload_for(metadata)
    metadata["watermark_payload"] = f"{payload:012x}"
    return embed_image(image, secret, payload)


def _file_hook(data: bytes, metadata: dict) -> bytes:
    kp = keys_dir()
    if not kp.exists():
        return data
    return sign_png(data, metadata, kp)


def install() -> None:
    """Watermark and sign every PNG that ``aigckit.image.io`` writes, whenever the key folder has keys (checked at
    each write, so ``aigc keys init`` takes effect at once). Idempotent."""
    from aigckit.image import io as image_io

    if _pixel_hook not in image_io.PIXEL_HOOKS:
        image_io.PIXEL_HOOKS.append(_pixel_hook)
    if _file_hook not in image_io.FILE_HOOKS:
        image_io.FILE_HOOKS.append(_file_hook)
