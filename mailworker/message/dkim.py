"""DKIM signatures (RFC 6376) over a message's final bytes, made with dkimpy
(``pip install "mailworker[dkim]"``).

Keys: RSA of at least :data:`MIN_RSA_BITS` bits (``rsa-sha256``) or Ed25519
(``ed25519-sha256``, RFC 8463), as PEM (PKCS#1 or PKCS#8, what ``openssl genpkey``
writes) or, for Ed25519, the base64 seed that dkimpy's ``dknewkey`` writes. A key is
read, checked and tried once (a signature made with it must verify against its own
public key) when :meth:`DkimSigner.load` is called, so a key that cannot sign is a
:class:`~mailworker.errors.ConfigError` at worker start, never an unsigned message.

Canonicalisation is relaxed/relaxed (a relay that re-folds headers or trims trailing
whitespace does not break the signature). :data:`SIGNED_HEADERS` are signed as often
as they occur and :data:`OVERSIGNED` ones once more, so that none can be added on the
way.

Sign the bytes as they go on the wire (CRLF line endings; the SMTP session dot-stuffs
after, and the receiver removes it before verifying). dkimpy's ``sign()`` always stamps
``t=`` with the current time; :meth:`DkimSigner.sign` takes the time instead, so a
message signed again for a retry gets the very same bytes (RSA PKCS#1 v1.5 and Ed25519
signatures are deterministic).
"""

from __future__ import annotations

import base64
import binascii
import importlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mailworker.errors import ConfigError

#: Header fields signed, each as often as it occurs in the message.
SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
#: Header fields signed once more than they occur ("over-signed"): a field of that name
#: added on the way breaks the signature.
OVERSIGNED: tuple[str, ...] = ("From",)
#: RFC 8301 §3.2 makes 1024 bits the floor and asks for 2048; we require 2048.
MIN_RSA_BITS = 2048
#: Header and body canonicalisation (RFC 6376 §3.4).
CANONICALIZATION = b"relaxed/relaxed"

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]

INSTALL_HINT = 'pip install "mailworker[dkim]"'
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
#: PKCS#8 PrivateKeyInfo of an Ed25519 key (RFC 8410) up to its 32-byte seed.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")
#: DER AlgorithmIdentifier of rsaEncryption (1.2.840.113549.1.1.1, NULL parameters).
_RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")
_SEQUENCE, _INTEGER, _BIT_STRING = 0x30, 0x02, 0x03


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"DKIM signing needs {module.partition('.')[0]!r}, which is not installed: "
            + INSTALL_HINT
        ) from None


@dataclass(frozen=True)
class DkimSigner:
    """Signs messages for ``domain`` with the key published at
    ``<selector>._domainkey.<domain>``. Build one with :meth:`load`.

    The private key is never part of ``repr()``.
    """

    domain: str
    selector: str
    algorithm: Algorithm
    #: Key size: the RSA modulus, or 256 for Ed25519.
    bits: int
    key_file: str
    #: The public key, base64, as the DNS record's ``p=`` holds it.
    public_key: str = field(repr=False)
    #: The private key as dkimpy signs with it (RSA parameters or a PyNaCl SigningKey).
    _private: Any = field(repr=False, compare=False)

    @classmethod
    def load(cls, *, domain: str, selector: str, key_file: str) -> DkimSigner:
        """Read, check and try the private key in ``key_file``.

        Raises:
            ConfigError: dkimpy (or, for Ed25519, PyNaCl) is not installed, or the file
                cannot be read, holds no usable key, an RSA key shorter than
                :data:`MIN_RSA_BITS` or a key whose signatures do not verify; the message
                names ``dkim_key_file`` and the file.
        """
        where = f"option dkim_key_file={key_file!r}"
        crypto = _import("dkim.crypto")
        try:
            text = Path(key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
        try:
            kind, der = _decode(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if kind == "ed25519":
            nacl = _import("nacl.signing")
            private = nacl.SigningKey(der)
            public = bytes(private.verify_key)
            signer = cls(domain, selector, "ed25519-sha256", 256, key_file, _b64(public), private)
        else:
            try:
                private = crypto.parse_private_key(der)
            except Exception:  # dkimpy's ASN.1 reader raises several kinds
                raise ConfigError(f"{where}: {_NOT_A_KEY}") from None
            bits = int(private["modulus"]).bit_length()
            if bits < MIN_RSA_BITS:
                raise ConfigError(
                    f"{where}: the RSA key has {bits} bits; DKIM keys need at least "
                    f"{MIN_RSA_BITS} (RFC 8301): openssl genpkey -algorithm RSA "
                    f"-pkeyopt rsa_keygen_bits:{MIN_RSA_BITS} -out KEY.pem"
                )
            public = _rsa_public_key(private["modulus"], private["publicExponent"])
            signer = cls(domain, selector, "rsa-sha256", bits, key_file, _b64(public), private)
        signer._self_test(where)
        return signer

    @property
    def record_name(self) -> str:
        """Where the public key is published: ``<selector>._domainkey.<domain>``."""
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def dns_record(self) -> str:
        """The TXT record to publish at :attr:`record_name`."""
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={kind}; p={self.public_key}"

    def signature(self, message: bytes, *, timestamp: int) -> bytes:
        """The ``DKIM-Signature`` field (ending in CRLF) for ``message`` as it goes on the
        wire, with ``t=timestamp``.

        This is dkimpy's ``DKIM.sign()`` with the time given rather than read from the
        clock (and our header list): the same tags in the same order, the same folding.
        """
        dkim = _import("dkim")
        algorithm = self.algorithm.encode()
        signer = dkim.DKIM(message, signature_algorithm=algorithm, linesep=b"\r\n")
        include = self.signed_headers(name for name, _ in signer.headers)
        policy = dkim.CanonicalizationPolicy.from_c_value(CANONICALIZATION)
        signer.hasher = dkim.HASH_ALGORITHMS[algorithm]
        body_hash = signer.hasher(policy.canonicalize_body(signer.body)).digest()
        domain = self.domain.encode()
        fields = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", CANONICALIZATION),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", self.selector.encode()),
            (b"t", str(timestamp).encode()),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(body_hash)),
            # A placeholder as long as a signature folds b= onto a line of its own, so
            # filling it in changes no other tag's folding (as dkimpy does).
            (b"b", b"0" * 60),
        ]
        value: bytes = signer.gen_header(fields, include, policy, b"DKIM-Signature", self._private)
        return b"DKIM-Signature: " + value

    def sign(self, message: bytes, *, timestamp: int) -> bytes:
        """``message`` (CRLF line endings) with its DKIM-Signature field on top.

        Raises:
            ConfigError: dkimpy is not installed.
        """
        return self.signature(message, timestamp=timestamp) + message

    @staticmethod
    def signed_headers(names: Iterable[bytes]) -> list[bytes]:
        """The ``h=`` list for a message with header fields ``names`` (in order): each
        of :data:`SIGNED_HEADERS` as often as it occurs, then :data:`OVERSIGNED` once
        more, lower-cased."""
        wanted = {h.lower().encode() for h in SIGNED_HEADERS}
        found = [n.lower() for n in names if n.lower() in wanted]
        return found + [h.lower().encode() for h in OVERSIGNED]

    def _self_test(self, where: str) -> None:
        """Sign a short message and verify it against our own public key."""
        dkim = _import("dkim")
        probe = self.sign(
            b"From: probe@" + self.domain.encode() + b"\r\nSubject: probe\r\n\r\nprobe\r\n",
            timestamp=0,
        )
        record = self.dns_record.encode()
        if not dkim.verify(probe, dnsfunc=lambda _name, timeout=5: record):
            raise ConfigError(f"{where}: signatures made with this key do not verify")


_NOT_A_KEY = (
    "not an unencrypted RSA or Ed25519 private key in PEM "
    "(e.g. from openssl genpkey -algorithm ed25519 -out KEY.pem)"
)


def _decode(text: bytes) -> tuple[Literal["rsa", "ed25519"], bytes]:
    """The key's kind and its DER (RSA) or 32-byte seed (Ed25519).

    Raises:
        ValueError: no key, or an encrypted one (the message says which).
    """
    text = text.replace(b"\r\n", b"\n")
    match = _PEM.search(text)
    if match is None:
        # dkimpy's dknewkey writes an Ed25519 key as its base64 seed, nothing else.
        seed = _unbase64(text)
        if seed is not None and len(seed) == 32:
            return "ed25519", seed
        raise ValueError(_NOT_A_KEY)
    label, body = match.group(1), match.group(2)
    if label == b"ENCRYPTED PRIVATE KEY" or b"ENCRYPTED" in body:
        raise ValueError(
            "the key is encrypted; the worker cannot ask for its passphrase: "
            "openssl pkey -in KEY.pem -out PLAIN.pem"
        )
    der = _unbase64(body)
    if der is None or label not in (b"PRIVATE KEY", b"RSA PRIVATE KEY"):
        raise ValueError(_NOT_A_KEY)
    if label == b"PRIVATE KEY" and der.startswith(_ED25519_PKCS8) and len(der) == 48:
        return "ed25519", der[len(_ED25519_PKCS8) :]
    return "rsa", der


def _unbase64(text: bytes) -> bytes | None:
    try:
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def _der_int(value: int) -> bytes:
    # A leading zero octet keeps a positive number positive (two's complement).
    return _der(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _rsa_public_key(modulus: int, exponent: int) -> bytes:
    """The SubjectPublicKeyInfo (DER) of an RSA public key, as ``p=`` publishes it."""
    key = _der(_SEQUENCE, _der_int(modulus) + _der_int(exponent))
    return _der(_SEQUENCE, _RSA_ALGORITHM + _der(_BIT_STRING, b"\0" + key))


__all__ = [
    "CANONICALIZATION",
    "MIN_RSA_BITS",
    "OVERSIGNED",
    "SIGNED_HEADERS",
    "DkimSigner",
]
