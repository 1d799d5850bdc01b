"""A rotated CA bundle or client certificate is used at the next connect, no restart."""

from __future__ import annotations

import os
from pathlib import Path

import trustme

from mailworker.smtp._setup import tls_context


def issuers(path: Path) -> list[object]:
    """The subjects of the CAs a context made for ``path`` trusts."""
    return [cert["subject"] for cert in tls_context(True, str(path), None, None).get_ca_certs()]


class TestCAReload:
    """Contexts are cached per file version."""

    def test_same_file_same_context(self, tmp_path: Path) -> None:
        """An unchanged CA file gives the cached context (no reload per connect)."""
        path = tmp_path / "ca.pem"
        trustme.CA(organization_name="First").cert_pem.write_to_path(str(path))
        assert tls_context(True, str(path), None, None) is tls_context(True, str(path), None, None)

    def test_rotated_file_is_read_again(self, tmp_path: Path) -> None:
        """After the CA file is replaced, the next context trusts the new CA only."""
        path = tmp_path / "ca.pem"
        trustme.CA(organization_name="First").cert_pem.write_to_path(str(path))
        before = issuers(path)
        replacement = tmp_path / "ca.pem.new"
        trustme.CA(organization_name="Second").cert_pem.write_to_path(str(replacement))
        os.replace(replacement, path)  # as a secret mount or certbot does
        after = issuers(path)
        assert "First" in str(before)
        assert "Second" not in str(before)
        assert "Second" in str(after)
        assert "First" not in str(after)
