"""Throwaway certificates for the TLS tests, made with the ``openssl`` command at test time.

:func:`make_certs` writes two CAs (``ca``, and ``other_ca`` that signed nothing the server
uses), a server certificate for ``scorer.test`` (DNS name only: a client calling
``127.0.0.1`` sets ``server_name``; it allows client auth too, as the chart's one Secret
needs), and a client certificate signed by ``ca``. Keys are
P-256 (fast to make); certificates are valid for two days.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Certs", "SERVER_NAME", "make_certs"]

SERVER_NAME = "scorer.test"

# `openssl req` wants a config; this one is enough with -subj, and ignores the system's.
_REQ_CONFIG = "[req]\ndistinguished_name = dn\n[dn]\n"

_EXTENSIONS = {
    "ca": "basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n",
    # clientAuth too: the chart's scorer probe presents the server's own certificate.
    "server": f"basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\n"
              f"extendedKeyUsage = serverAuth, clientAuth\nsubjectAltName = DNS:{SERVER_NAME}\n",
    "client": "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = clientAuth\n",
}


@dataclass(frozen=True)
class Certs:
    """Paths of the PEM files :func:`make_certs` wrote."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _request(folder: Path, name: str, subject: str) -> None:
    """``name.key`` and ``name.csr`` (P-256, unencrypted)."""
    _openssl("req", "-new", "-config", "req.cnf", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={subject}", cwd=folder)


def _sign(folder: Path, name: str, kind: str, ca: str | None) -> None:
    """``name.crt`` from ``name.csr``, signed by ``ca`` (None: self-signed)."""
    (folder / f"{name}.ext").write_text(_EXTENSIONS[kind])
    signer = ["-signkey", f"{name}.key"] if ca is None else ["-CA", f"{ca}.crt", "-CAkey", f"{ca}.key"]
    _openssl("x509", "-req", "-in", f"{name}.csr", *signer, "-days", "2", "-sha256",
             "-set_serial", str(abs(hash(name)) + 1), "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder)


def make_certs(folder: Path) -> Certs:
    """Write the CAs and certificates into ``folder``; skips the test without ``openssl``."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests make their certificates with the `openssl` command, which is not installed")
    (folder / "req.cnf").write_text(_REQ_CONFIG)
    for name, kind, subject, ca in (("ca", "ca", "switchyard test CA", None),
                                    ("other_ca", "ca", "another CA", None),
                                    ("server", "server", SERVER_NAME, "ca"),
                                    ("client", "client", "switchyard sidecar", "ca")):
        _request(folder, name, subject)
        _sign(folder, name, kind, ca)
    return Certs(ca=folder / "ca.crt", other_ca=folder / "other_ca.crt", server_cert=folder / "server.crt",
                 server_key=folder / "server.key", client_cert=folder / "client.crt", client_key=folder / "client.key")


def renewed_server(certs: Certs, folder: Path) -> tuple[Path, Path]:
    """A second server certificate and key for :data:`SERVER_NAME`, signed by the *other* CA
    (a renewal under a new CA), written into ``folder``: ``(cert, key)``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "req.cnf").write_text(_REQ_CONFIG)
    _request(folder, "renewed", SERVER_NAME)
    _sign(folder, "renewed", "server", str(certs.other_ca.with_suffix("")))
    return folder / "renewed.crt", folder / "renewed.key"
