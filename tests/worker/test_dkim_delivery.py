"""DKIM end to end: messages delivered through a Delivery to a real SMTP server verify with
dkimpy against a DNS stub serving the public key, every attempt sends the same signed
bytes, and a key that cannot sign stops the worker and ``mailworker check``, never a
message."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from click.testing import CliRunner, Result

from mailworker.cli import main
from mailworker.errors import ConfigError
from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.smtp.profile import Profile
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.delivery import Delivery
from mailworker.worker.prepare import dkim_signer
from tests.message.test_dkim import (
    KeyFile,
    dns_stub,
    signature_tags,
    write_ed25519_key,
    write_rsa_key,
)
from tests.servers import SMTPServer, smtp_url
from tests.servers.recording import ReceivedMessage

SENDER = "shop@example.com"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.4\n" + bytes(reversed(range(256))) * 8 + b"\n%%EOF\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def dkim_options(key_file: Path) -> dict[str, str]:
    """The profile URL options that sign with ``key_file`` as s1._domainkey.example.com."""
    return {"dkim_domain": "example.com", "dkim_selector": "s1", "dkim_key_file": str(key_file)}


def verified(received: ReceivedMessage, key: KeyFile) -> bool:
    """Whether the message as the server received it verifies against ``key``."""
    return bool(dkim.verify(received.content, dnsfunc=dns_stub(key)))


class FakeClock:
    """A clock that moves only when told to (starts at the real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyFile]:
    """``rsa`` (2048 bits), ``ed25519`` and ``rsa_1024`` key files."""
    folder = tmp_path_factory.mktemp("dkim-delivery-keys")
    return {
        "rsa": write_rsa_key(folder / "rsa.pem"),
        "ed25519": write_ed25519_key(folder / "ed25519.pem"),
        "rsa_1024": write_rsa_key(folder / "rsa-1024.pem", 1024),
    }


@pytest.fixture(params=["rsa", "ed25519"])
def key(request: pytest.FixtureRequest, keys: dict[str, KeyFile]) -> KeyFile:
    """An RSA 2048 and an Ed25519 key, one per test run."""
    return keys[request.param]


@pytest.fixture
def signing(
    make_delivery: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
) -> Callable[..., Delivery]:
    """Factory: a Delivery whose default profile signs with ``key`` (``**env`` as for
    ``make_delivery``)."""

    def create(**env: Any) -> Delivery:
        url = smtp_url(smtpd.port, scheme="smtp", timeout=5, **dkim_options(key.path))
        return make_delivery(MAILWORKER_SMTP_URL=url, **env)

    return create


def mail(**overrides: Any) -> dict[str, Any]:
    """send_mail kwargs from SENDER; ``overrides`` replace fields."""
    return {"from_email": f"Shop <{SENDER}>", "to": "ann@example.org", **overrides}


class TestReceivedMessagesVerify:
    """What the server receives verifies against the published key."""

    def test_plain_text(
        self, signing: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
    ) -> None:
        """A plain-text send_mail arrives with one DKIM-Signature, first, for d=example.com
        and s=s1, and verifies."""
        result = signing().run(SEND_MAIL, "dkim-plain", mail(subject="Hello", text="Hi Ann\n"))

        [received] = smtpd.handler.wait_for_messages(1)
        assert result["status"] == "sent"
        assert received.content.startswith(b"DKIM-Signature: v=1; a=")
        assert received.content.count(b"DKIM-Signature:") == 1
        tags = signature_tags(received.content)
        assert (tags["d"], tags["s"], tags["c"]) == ("example.com", "s1", "relaxed/relaxed")
        assert verified(received, key)

    def test_html_and_attachments(
        self, signing: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
    ) -> None:
        """Text, HTML, an inline image and an attachment, with a List-Unsubscribe header:
        the multipart message verifies and List-Unsubscribe is signed."""
        kwargs = mail(
            subject="Your invoice",
            text="Invoice attached.\n",
            html='<p>Invoice attached.</p><img src="cid:logo@example.com">',
            headers={"List-Unsubscribe": "<https://example.com/unsubscribe/1>"},
            attachments=[
                {"filename": "invoice.pdf", "content": b64(PDF), "mimetype": "application/pdf"},
                {
                    "filename": "logo.png",
                    "content": b64(PNG),
                    "mimetype": "image/png",
                    "content_id": "logo@example.com",
                },
            ],
        )

        signing().run(SEND_MAIL, "dkim-html", kwargs)

        [received] = smtpd.handler.wait_for_messages(1)
        assert received.parsed().get_content_type() == "multipart/mixed"
        assert "list-unsubscribe" in signature_tags(received.content)["h"].split(":")
        assert verified(received, key)

    def test_utf8_headers(
        self, signing: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
    ) -> None:
        """An SMTPUTF8 message (a non-ASCII mailbox: UTF-8 in the headers as sent) with a
        non-ASCII subject and body verifies."""
        kwargs = mail(
            to=["Jürgen Groß <jürgen@example.org>"],
            subject="Grüße aus Köln ✓",
            text="Hallo Jürgen,\nschöne Grüße.\n",
        )

        signing().run(SEND_MAIL, "dkim-utf8", kwargs)

        [received] = smtpd.handler.wait_for_messages(1)
        assert "SMTPUTF8" in received.mail_options
        assert not received.content.split(b"\r\n\r\n", 1)[0].isascii()
        assert verified(received, key)

    def test_dot_stuffed_body(
        self, signing: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
    ) -> None:
        """Lines starting with a dot, and a line of one dot, are dot-stuffed on the wire
        and arrive as written: the signature, made before stuffing, verifies."""
        text = ".leading dot\n..two dots\n.\nlast line\n"

        signing().run(SEND_MAIL, "dkim-dots", mail(subject="Dots", text=text))

        [received] = smtpd.handler.wait_for_messages(1)
        assert b"\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n" in received.content
        assert verified(received, key)

    def test_prebuilt_message(
        self, signing: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
    ) -> None:
        """send_message signs the caller's bytes as sent (CRLF line endings, 8-bit body,
        leading dots): the server receives the signature and those bytes."""
        raw = (
            b"From: Shop <shop@example.com>\nTo: ann@example.org\nSubject: prebuilt\n"
            b"Message-ID: <prebuilt-1@example.com>\nMIME-Version: 1.0\n"
            b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
            + "Grüße\n.a line with a leading dot\n".encode()
        )
        kwargs = {"raw_b64": b64(raw), "envelope_from": SENDER, "recipients": ["ann@example.org"]}

        signing().run(SEND_MESSAGE, "dkim-raw", kwargs)

        [received] = smtpd.handler.wait_for_messages(1)
        signature, _, rest = received.content.partition(b"\r\nFrom: ")
        assert signature.startswith(b"DKIM-Signature: ")
        assert b"From: " + rest == raw.replace(b"\n", b"\r\n")
        assert verified(received, key)

    def test_tampered_header_fails(
        self, signing: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
    ) -> None:
        """The received message with its Subject changed, or a From header added, no
        longer verifies."""
        signing().run(SEND_MAIL, "dkim-tamper", mail(subject="Original", text="Hi\n"))
        [received] = smtpd.handler.wait_for_messages(1)
        stub = dns_stub(key)
        assert dkim.verify(received.content, dnsfunc=stub)

        changed = received.content.replace(b"Subject: Original", b"Subject: Changed")
        added = received.content.replace(b"\r\n\r\n", b"\r\nFrom: eve@example.net\r\n\r\n", 1)

        assert not dkim.verify(changed, dnsfunc=stub)
        assert not dkim.verify(added, dnsfunc=stub)

    def test_profile_without_dkim_sends_unsigned(
        self, make_delivery: Callable[..., Delivery], smtpd: SMTPServer
    ) -> None:
        """A profile without dkim_* options sends the message as built, unsigned."""
        make_delivery().run(SEND_MAIL, "no-dkim", mail(subject="Hi", text="Hi\n"))

        [received] = smtpd.handler.wait_for_messages(1)
        assert b"DKIM-Signature" not in received.content


class TestRetriesSendTheSameBytes:
    """Every attempt of a message sends the same signed bytes (same Message-ID, Date,
    MIME boundaries and signature, t= included)."""

    def test_in_process_retry(
        self, signing: Callable[..., Delivery], smtpd: SMTPServer, key: KeyFile
    ) -> None:
        """A 451 after DATA, retried in process on a new connection: the refused and the
        accepted copies are byte for byte the same, and verify."""
        smtpd.handler.data_reply_once = "451 4.3.0 try again"

        result = signing().run(SEND_MAIL, "dkim-retry", mail(subject="Retry", text="Hi\n"))

        [sent] = smtpd.handler.wait_for_messages(1)
        [refused] = smtpd.handler.rejected
        assert result["attempts"] == 2
        assert refused.content == sent.content
        assert verified(sent, key)

    def test_delayed_retry(
        self,
        signing: Callable[..., Delivery],
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        key: KeyFile,
    ) -> None:
        """A multipart message deferred for a delayed retry, rebuilt and signed again a
        few seconds later, sends the bytes of the first attempt, t= included."""
        clock = FakeClock()
        started = clock.now
        delivery = signing(clock=clock)
        smtpd.handler.data_reply = "451 4.3.0 try again later"
        kwargs = mail(
            subject="Later",
            text="Hi\n",
            html="<p>Hi</p>",
            attachments=[{"filename": "a.pdf", "content": b64(PDF)}],
        )
        first = delivery.run(SEND_MAIL, "dkim-delayed", kwargs)
        assert first["status"] == "deferred"
        smtpd.handler.data_reply = None
        time.sleep(1.1)  # a message built now would get a later Date, a new t=
        clock.now = first["retry_at"]
        [retry] = schedule.claim_due(now=clock.now)
        schedule.done(retry.id)

        result = delivery.run(retry.task, retry.id, retry.kwargs)

        [sent] = smtpd.handler.wait_for_messages(1)
        assert result["status"] == "sent"
        assert {m.content for m in smtpd.handler.rejected} == {sent.content}
        assert signature_tags(sent.content)["t"] == str(int(started)), "the first attempt's"
        assert verified(sent, key)


class TestKeyProblems:
    """A DKIM key that cannot sign is a configuration error where the key is loaded:
    never a message sent unsigned."""

    def test_profile_options_go_together(self) -> None:
        """dkim_domain, dkim_selector and dkim_key_file are all given or none; the error
        names the missing ones."""
        with pytest.raises(ConfigError, match="dkim_selector and dkim_key_file missing"):
            Profile.from_url("smtp://localhost?dkim_domain=example.com")

    @pytest.mark.parametrize(
        ("domain", "selector", "named"),
        [
            ("exa mple.com", "s1", "dkim_domain"),
            ("-x.example.com", "s1", "dkim_domain"),
            ("example.com", "s1\n", "dkim_selector"),
            ("example.com", "", "dkim_selector"),
        ],
    )
    def test_malformed_domain_or_selector(self, domain: str, selector: str, named: str) -> None:
        """A domain or selector that is not a domain name is a ConfigError naming it."""
        url = smtp_url(25, scheme="smtp", dkim_domain=domain, dkim_selector=selector)

        with pytest.raises(ConfigError, match=rf"{named} .* is not a domain name"):
            Profile.from_url(url + "&dkim_key_file=k")

    def test_key_file_named_at_profile_load(self, keys: dict[str, KeyFile]) -> None:
        """Loading the profile's signer (what the worker does at start) with a 1024-bit
        key is a ConfigError naming the profile, the option and the file."""
        url = smtp_url(25, scheme="smtp", **dkim_options(keys["rsa_1024"].path))
        profile = Profile.from_url(url, name="bulk")

        with pytest.raises(ConfigError) as caught:
            dkim_signer(profile)

        assert str(caught.value).startswith(
            f"profile 'bulk': option dkim_key_file={str(keys['rsa_1024'].path)!r}: "
            "the RSA key has 1024 bits"
        )

    def test_unusable_key_defers_the_message(
        self, make_delivery: Callable[..., Delivery], smtpd: SMTPServer, tmp_path: Path
    ) -> None:
        """A worker whose key became unreadable after it started sends nothing: the
        message waits for a delayed retry, the error naming the key file."""
        path = tmp_path / "gone.pem"
        url = smtp_url(smtpd.port, scheme="smtp", timeout=5, **dkim_options(path))

        result = make_delivery(MAILWORKER_SMTP_URL=url).run(
            SEND_MAIL, "dkim-gone", mail(subject="s", text="x")
        )

        assert result["status"] == "deferred"
        assert f"dkim_key_file={str(path)!r}" in result["error"]["message"]
        assert smtpd.handler.messages == []
        assert smtpd.handler.counts["MAIL"] == 0


def run_cli(*args: str, url: str) -> Result:
    """``mailworker ARGS`` with MAILWORKER_SMTP_URL=url and no other profile."""
    env = {"MAILWORKER_SMTP_URL": url, "MAILWORKER_SMTP_URL_BULK": None}
    return CliRunner().invoke(main, list(args), env=env)


class TestCommands:
    """``mailworker worker`` and ``mailworker check`` load and check the key first."""

    @pytest.mark.parametrize("command", ["worker", "check"])
    @pytest.mark.parametrize("problem", ["short", "missing", "garbage"])
    def test_bad_key_is_a_usage_error(
        self, keys: dict[str, KeyFile], tmp_path: Path, command: str, problem: str
    ) -> None:
        """A 1024-bit, missing or garbage key stops the command before it starts Celery
        or connects, with a usage error naming the option and the file."""
        path = {
            "short": keys["rsa_1024"].path,
            "missing": tmp_path / "missing.pem",
            "garbage": tmp_path / "garbage.pem",
        }[problem]
        (tmp_path / "garbage.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
        url = smtp_url(1, scheme="smtp", **dkim_options(path))

        result = run_cli(command, url=url)

        assert result.exit_code == 2, result.output
        assert f"option dkim_key_file={str(path)!r}" in result.output
        assert "profile 'default'" in result.output

    def test_check_prints_the_record_to_publish(self, smtpd: SMTPServer, key: KeyFile) -> None:
        """With a good key, check says so and prints the TXT record to publish, which is
        the one the verifier needs."""
        url = smtp_url(smtpd.port, scheme="smtp", timeout=5, **dkim_options(key.path))

        result = run_cli("check", url=url)

        assert result.exit_code == 0, result.output
        algorithm = "rsa-sha256" if key.kind == "rsa" else "ed25519-sha256"
        assert re.search(
            rf"^DKIM: +{algorithm}, \d+-bit key .*: a test signature", result.output, re.M
        )
        assert re.search(r"^ +signs as d=example.com, s=s1$", result.output, re.M)
        assert re.search(r"^DKIM record: +s1._domainkey.example.com TXT$", result.output, re.M)
        assert f"\n{'':14} {key.record.decode()}\n" in result.output
