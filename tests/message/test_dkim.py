"""DKIM signing (mailworker.message.dkim): keys read and checked, signatures that dkimpy's
verifier accepts against a DNS stub serving the public key, and that break when the
message is tampered with."""

from __future__ import annotations

import base64
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailworker.errors import ConfigError
from mailworker.message.dkim import MIN_RSA_BITS, DkimSigner

DOMAIN = "example.com"
SELECTOR = "s1"
T = 1_700_000_000

MESSAGE = (
    b"From: Shop <shop@example.com>\r\n"
    b"To: ann@example.org\r\n"
    b"Subject: Your order\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <order-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Campaign: autumn\r\n"
    b"\r\n"
    b"Thank you.\r\n"
    b".A line with a leading dot\r\n"
)


@dataclass(frozen=True)
class KeyFile:
    """A private key written to a file, and its public key as the DNS record publishes
    it, derived with ``cryptography`` (not by the code under test)."""

    path: Path
    kind: str
    public_key: str

    @property
    def record(self) -> bytes:
        return f"v=DKIM1; k={self.kind}; p={self.public_key}".encode()

    def signer(self, domain: str = DOMAIN, selector: str = SELECTOR) -> DkimSigner:
        return DkimSigner.load(domain=domain, selector=selector, key_file=str(self.path))


def write_rsa_key(path: Path, bits: int = 2048, *, pkcs1: bool = False) -> KeyFile:
    """An RSA key of ``bits`` in PEM: PKCS#8 (``openssl genpkey``) or PKCS#1."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    form = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if pkcs1
        else serialization.PrivateFormat.PKCS8
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, form, _no_encryption()))
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyFile(path, "rsa", base64.b64encode(public).decode())


def write_ed25519_key(path: Path, *, seed_only: bool = False) -> KeyFile:
    """An Ed25519 key in PKCS#8 PEM (``openssl genpkey -algorithm ed25519``), or as the
    base64 seed dkimpy's ``dknewkey`` writes."""
    key = ed25519.Ed25519PrivateKey.generate()
    if seed_only:
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, _no_encryption()
        )
        path.write_bytes(base64.b64encode(raw))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _no_encryption()
            )
        )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return KeyFile(path, "ed25519", base64.b64encode(public).decode())


def _no_encryption() -> serialization.KeySerializationEncryption:
    return serialization.NoEncryption()


def dns_stub(key: KeyFile, selector: str = SELECTOR, domain: str = DOMAIN) -> DNSStub:
    """dkimpy's ``dnsfunc``: serves the key's TXT record at
    ``<selector>._domainkey.<domain>.``."""
    return DNSStub({f"{selector}._domainkey.{domain}.".encode(): key.record})


class DNSStub:
    """Answers TXT queries from a dict and remembers them."""

    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.records = records
        self.queries: list[bytes] = []

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.queries.append(name)
        return self.records.get(name)


def verifies(message: bytes, key: KeyFile) -> bool:
    """Whether dkimpy verifies the topmost DKIM signature of ``message`` against ``key``
    published at s1._domainkey.example.com."""
    return bool(dkim.verify(message, dnsfunc=dns_stub(key)))


def signature_tags(message: bytes) -> dict[str, str]:
    """The tags of the topmost DKIM-Signature field, whitespace removed."""
    match = re.match(rb"DKIM-Signature:(.*?)\r\n(?=\S)", message, re.DOTALL)
    assert match, message[:200]
    value = re.sub(r"\s+", "", match.group(1).decode())
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyFile]:
    """Key files: ``rsa`` (2048, PKCS#8), ``rsa_pkcs1``, ``ed25519`` (PKCS#8 PEM),
    ``ed25519_seed`` (dknewkey's format) and ``rsa_1024``."""
    folder = tmp_path_factory.mktemp("dkim-keys")
    return {
        "rsa": write_rsa_key(folder / "rsa.pem"),
        "rsa_pkcs1": write_rsa_key(folder / "rsa-pkcs1.pem", pkcs1=True),
        "ed25519": write_ed25519_key(folder / "ed25519.pem"),
        "ed25519_seed": write_ed25519_key(folder / "ed25519.key", seed_only=True),
        "rsa_1024": write_rsa_key(folder / "rsa-1024.pem", 1024),
    }


@pytest.fixture(params=["rsa", "ed25519"])
def key(request: pytest.FixtureRequest, keys: dict[str, KeyFile]) -> KeyFile:
    """An RSA 2048 and an Ed25519 key, one per test run."""
    return keys[request.param]


class TestSignatures:
    """Signed messages verify with dkimpy against the published key, and only as sent."""

    def test_signed_message_verifies(self, key: KeyFile) -> None:
        """The message, signed, verifies against a DNS stub serving the public key at
        s1._domainkey.example.com."""
        stub = dns_stub(key)
        signed = key.signer().sign(MESSAGE, timestamp=T)

        assert dkim.verify(signed, dnsfunc=stub)
        assert stub.queries == [b"s1._domainkey.example.com."]
        assert signed.endswith(MESSAGE)

    def test_tags(self, key: KeyFile) -> None:
        """The signature is relaxed/relaxed, for d= and s= of the profile, stamped with
        the given time, over the documented header fields present (not X-Campaign),
        From once more."""
        algorithm = "rsa-sha256" if key.kind == "rsa" else "ed25519-sha256"

        tags = signature_tags(key.signer().sign(MESSAGE, timestamp=T))

        assert tags["a"] == algorithm
        assert tags["c"] == "relaxed/relaxed"
        assert (tags["d"], tags["s"], tags["t"]) == (DOMAIN, SELECTOR, str(T))
        assert tags["h"].split(":") == [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "mime-version",
            "content-type",
            "from",
        ]
        assert "l" not in tags, "no body length: nothing may be appended"

    def test_list_unsubscribe_and_repeated_fields_are_signed(self, key: KeyFile) -> None:
        """List-Unsubscribe and List-Unsubscribe-Post are signed; a field that occurs
        twice is signed twice."""
        message = (
            b"From: shop@example.com\r\nTo: ann@example.org\r\nTo: bob@example.org\r\n"
            b"List-Unsubscribe: <https://example.com/u/1>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\nHi\r\n"
        )

        signed = key.signer().sign(message, timestamp=T)

        assert signature_tags(signed)["h"].split(":") == [
            "from",
            "to",
            "to",
            "list-unsubscribe",
            "list-unsubscribe-post",
            "from",
        ]
        assert verifies(signed, key)

    def test_same_time_same_bytes(self, key: KeyFile) -> None:
        """Signing the same bytes with the same time gives the same signed bytes (what
        lets a retry send exactly what the first attempt sent); another time differs."""
        signer = key.signer()

        assert signer.sign(MESSAGE, timestamp=T) == signer.sign(MESSAGE, timestamp=T)
        assert signer.sign(MESSAGE, timestamp=T) != signer.sign(MESSAGE, timestamp=T + 1)

    def test_same_bytes_as_dkimpys_own_sign(
        self, key: KeyFile, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With dkimpy's clock stopped at the same time, dkimpy's sign() with our header
        list and relaxed/relaxed writes the very same field: ours only pins the time."""
        signer = key.signer()
        include = signer.signed_headers(name for name, _ in dkim.DKIM(MESSAGE).headers)
        private = key.path.read_bytes()
        if key.kind == "ed25519":  # dkimpy signs with the base64 seed
            pem_body = private.split(b"-----")[2]
            private = base64.b64encode(base64.b64decode(pem_body)[-32:])
        monkeypatch.setattr(dkim, "time", SimpleNamespace(time=lambda: T))

        theirs = dkim.sign(
            MESSAGE,
            SELECTOR.encode(),
            DOMAIN.encode(),
            private,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=signer.algorithm.encode(),
            include_headers=include,
        )

        assert signer.signature(MESSAGE, timestamp=T) == theirs

    @pytest.mark.parametrize(
        ("old", "new"),
        [
            (b"Subject: Your order", b"Subject: Your 0rder"),
            (b"To: ann@example.org", b"To: eve@example.org"),
            (b"Thank you.", b"Thank you!"),
            (b"X-Campaign: autumn\r\n", b"X-Campaign: autumn\r\nFrom: eve@example.net\r\n"),
        ],
        ids=["subject", "to", "body", "added-from"],
    )
    def test_tampered_message_fails(self, key: KeyFile, old: bytes, new: bytes) -> None:
        """A changed signed header, a changed body or an added From header (From is
        over-signed) fails verification."""
        signed = key.signer().sign(MESSAGE, timestamp=T)
        assert verifies(signed, key)

        assert not verifies(signed.replace(old, new, 1), key)

    def test_unsigned_header_may_change(self, key: KeyFile) -> None:
        """A header outside the list (X-Campaign) is not covered."""
        signed = key.signer().sign(MESSAGE, timestamp=T)

        assert verifies(signed.replace(b"autumn", b"winter"), key)

    def test_relaxed_canonicalisation_survives_refolding(self, key: KeyFile) -> None:
        """A relay that re-folds a header or adds trailing whitespace keeps it valid."""
        signed = key.signer().sign(MESSAGE, timestamp=T)
        refolded = signed.replace(b"Subject: Your order", b"Subject: Your\r\n\torder  ")

        assert verifies(refolded, key)

    def test_wrong_published_key_fails(self, keys: dict[str, KeyFile]) -> None:
        """A signature does not verify against another key published at the selector."""
        signed = keys["rsa"].signer().sign(MESSAGE, timestamp=T)

        assert not verifies(signed, keys["rsa_pkcs1"])

    def test_utf8_headers_and_8bit_body(self, key: KeyFile) -> None:
        """An SMTPUTF8 message (UTF-8 in headers and an 8-bit body) verifies."""
        message = (
            "From: Zoë <zoë@example.com>\r\nTo: Jürgen <jürgen@example.org>\r\n"
            "Subject: Grüße ✓\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nHallo Jürgen,\r\n.ünd tschüss\r\n"
        ).encode()

        assert verifies(key.signer().sign(message, timestamp=T), key)


class TestKeys:
    """Key files are read and checked when the signer is loaded."""

    @pytest.mark.parametrize("name", ["rsa", "rsa_pkcs1", "ed25519", "ed25519_seed"])
    def test_formats(self, keys: dict[str, KeyFile], name: str) -> None:
        """PKCS#8 and PKCS#1 RSA, PKCS#8 Ed25519 and dknewkey's Ed25519 seed load, and
        the TXT record carries the public key as DNS must publish it."""
        key = keys[name]

        signer = key.signer()

        assert signer.dns_record.encode() == key.record
        assert signer.record_name == "s1._domainkey.example.com"
        assert signer.bits == (2048 if key.kind == "rsa" else 256)

    def test_key_file_with_crlf_line_endings(
        self, keys: dict[str, KeyFile], tmp_path: Path
    ) -> None:
        """A PEM file saved with CRLF line endings loads too."""
        path = tmp_path / "crlf.pem"
        path.write_bytes(keys["rsa"].path.read_bytes().replace(b"\n", b"\r\n"))

        assert DkimSigner.load(domain=DOMAIN, selector=SELECTOR, key_file=str(path)).bits == 2048

    def test_short_rsa_key_is_refused(self, keys: dict[str, KeyFile]) -> None:
        """A 1024-bit RSA key is a ConfigError naming the option, the file, its size and
        the minimum."""
        key = keys["rsa_1024"]

        with pytest.raises(ConfigError) as caught:
            key.signer()

        text = str(caught.value)
        assert f"dkim_key_file={str(key.path)!r}" in text
        assert "1024 bits" in text
        assert str(MIN_RSA_BITS) in text

    @pytest.mark.parametrize(
        ("content", "problem"),
        [
            (None, "cannot read it: No such file or directory"),
            (b"", "not an unencrypted RSA or Ed25519 private key"),
            (b"not a key\n", "not an unencrypted RSA or Ed25519 private key"),
            (
                b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                "not an unencrypted RSA or Ed25519 private key",
            ),
            (
                b"-----BEGIN PRIVATE KEY-----\nMIIBAAAA\n-----END PRIVATE KEY-----\n",
                "not an unencrypted RSA or Ed25519 private key",
            ),
            (
                b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n"
                b"-----END ENCRYPTED PRIVATE KEY-----\n",
                "encrypted",
            ),
        ],
        ids=["missing", "empty", "text", "certificate", "truncated", "encrypted"],
    )
    def test_unusable_file(self, tmp_path: Path, content: bytes | None, problem: str) -> None:
        """A file that is missing or holds no usable key is a ConfigError naming the
        option and the file."""
        path = tmp_path / "dkim.pem"
        if content is not None:
            path.write_bytes(content)

        with pytest.raises(ConfigError) as caught:
            DkimSigner.load(domain=DOMAIN, selector=SELECTOR, key_file=str(path))

        assert f"option dkim_key_file={str(path)!r}: " in str(caught.value)
        assert problem in str(caught.value)

    def test_directory(self, tmp_path: Path) -> None:
        """A directory instead of a file says it cannot be read."""
        with pytest.raises(ConfigError, match="cannot read it"):
            DkimSigner.load(domain=DOMAIN, selector=SELECTOR, key_file=str(tmp_path))

    def test_repr_has_no_key(self, keys: dict[str, KeyFile]) -> None:
        """repr() shows where the key is, never the key."""
        signer = keys["rsa"].signer()

        assert repr(signer) == (
            f"DkimSigner(domain='example.com', selector='s1', algorithm='rsa-sha256', "
            f"bits=2048, key_file={str(keys['rsa'].path)!r})"
        )

    @pytest.mark.parametrize(
        ("modules", "key_name"),
        [(("dkim", "dkim.crypto"), "rsa"), (("nacl", "nacl.signing"), "ed25519")],
    )
    def test_missing_extra(
        self,
        keys: dict[str, KeyFile],
        monkeypatch: pytest.MonkeyPatch,
        modules: tuple[str, ...],
        key_name: str,
    ) -> None:
        """Without dkimpy (or PyNaCl, for Ed25519) loading a key is a ConfigError giving
        the exact pip install."""
        for module in modules:
            monkeypatch.setitem(sys.modules, module, None)

        with pytest.raises(ConfigError, match=re.escape('pip install "mailworker[dkim]"')):
            keys[key_name].signer()
