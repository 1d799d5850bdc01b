"""A throw-away ``trustme`` CA with one good and three bad server certificates."""

from __future__ import annotations

import datetime
import os
import ssl
import threading
from pathlib import Path
from typing import Final, Literal, get_args

import trustme

from mailworker.dev._smtp import server_context
from tests.servers.base import LOCALHOST, SERVER_HOSTNAME, WRONG_HOSTNAME

CertChoice = Literal["good", "wrong_host", "untrusted", "expired"]
CERT_CHOICES: Final[tuple[CertChoice, ...]] = get_args(CertChoice)


class TLSMaterials:
    """A test CA with one good and three bad server certificates.

    Attributes:
        ca: The trusted ``trustme.CA``; its PEM is written to :attr:`ca_file`.
        ca_file: Path of the trusted CA's PEM (clients use ``ca_file=``).
        untrusted_ca: A second CA that nobody trusts.
        certs: Leaf certificates by :data:`CertChoice`: ``"good"`` (for
            ``localhost`` and IP ``127.0.0.1``), ``"wrong_host"`` (only
            ``wrong.example``), ``"untrusted"`` (right names, untrusted CA),
            ``"expired"`` (right names and CA, expired yesterday).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Create the CAs and certificates and write ``ca.pem`` into ``directory``."""
        self.ca = trustme.CA()
        self.untrusted_ca = trustme.CA()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certs: dict[CertChoice, trustme.LeafCert] = {
            "good": self.ca.issue_cert(SERVER_HOSTNAME, LOCALHOST),
            "wrong_host": self.ca.issue_cert(WRONG_HOSTNAME),
            "untrusted": self.untrusted_ca.issue_cert(SERVER_HOSTNAME, LOCALHOST),
            "expired": self.ca.issue_cert(
                SERVER_HOSTNAME,
                LOCALHOST,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            ),
        }
        self.ca_file = self.write_ca_file(Path(directory) / "ca.pem")
        self._contexts: dict[CertChoice, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def write_ca_file(self, path: str | os.PathLike[str]) -> Path:
        """Write the trusted CA certificate (PEM) to ``path`` and return it."""
        target = Path(path)
        self.ca.cert_pem.write_to_path(target)
        return target

    def server_context(self, cert: CertChoice = "good") -> ssl.SSLContext:
        """Return a (cached) server-side context presenting the chosen certificate."""
        check_cert(cert)
        with self._lock:
            if cert not in self._contexts:
                self._contexts[cert] = server_context(self.certs[cert])
            return self._contexts[cert]

    def client_context(self) -> ssl.SSLContext:
        """Return a new verifying client context that trusts only :attr:`ca`."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def check_cert(cert: str) -> None:
    """Raise ValueError unless ``cert`` is a :data:`CertChoice`."""
    if cert not in CERT_CHOICES:
        raise ValueError(f"cert must be one of {CERT_CHOICES}, not {cert!r}")
