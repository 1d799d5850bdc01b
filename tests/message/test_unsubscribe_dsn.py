"""The ``list_unsubscribe``/``list_unsubscribe_post`` arguments (RFC 2369, RFC 8058) and
the ``dsn`` task option (RFC 3461): what is taken, what is refused, and the header bytes
written, read back as a receiver reads them."""

from __future__ import annotations

import base64
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from mailworker.errors import InvalidMessageError
from mailworker.message import MailPayload, RawPayload, build_message, message_bytes
from mailworker.message.payload import DSNOptions, check_dsn
from tests.message.test_dkim import signature_tags, verifies, write_ed25519_key

SENDER = "shop@example.com"
HTTPS = "https://shop.example/unsub?u=42&t=a1b2"
MAILTO = "mailto:unsub@shop.example?subject=unsubscribe"
ONE_CLICK = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
#: Encoded-words that decode to CR LF and a new header field.
CRLF_BCC = "=?utf-8?q?a=0D=0ABcc:_evil@attacker.example?="


def kwargs_for(**fields: Any) -> dict[str, Any]:
    """send_mail kwargs: a recipient, subject and body, plus ``fields``."""
    return {"to": "ann@example.org", "subject": "News", "text": "Hi\n", **fields}


def build(**fields: Any) -> bytes:
    """The bytes send_mail sends for ``fields``."""
    payload = MailPayload.from_task_kwargs(kwargs_for(**fields), default_from=SENDER)
    return message_bytes(build_message(payload))


def head(data: bytes) -> bytes:
    """The header block, CRLF included, without the blank line."""
    return data.partition(b"\r\n\r\n")[0] + b"\r\n"


def read(data: bytes) -> EmailMessage:
    """The message as a receiver parses it."""
    parsed = BytesParser(_class=EmailMessage, policy=policy.default).parsebytes(data)
    assert isinstance(parsed, EmailMessage)
    return parsed


def refused(**fields: Any) -> InvalidMessageError:
    """The error send_mail validation raises for ``fields``."""
    with pytest.raises(InvalidMessageError) as failure:
        build(**fields)
    return failure.value


class TestListUnsubscribe:
    """``list_unsubscribe`` and ``list_unsubscribe_post`` write exactly these bytes."""

    def test_header_bytes(self) -> None:
        """Two URIs and one-click give the two fields, right after Message-ID."""
        data = build(list_unsubscribe=[HTTPS, MAILTO], list_unsubscribe_post=True)
        expected = f"List-Unsubscribe: <{HTTPS}>,\r\n <{MAILTO}>\r\n".encode() + ONE_CLICK
        assert expected in head(data)
        names = [line.split(b":")[0] for line in head(data).split(b"\r\n") if line[:1] > b" "]
        at = names.index(b"Message-ID")
        assert names[at + 1 : at + 3] == [b"List-Unsubscribe", b"List-Unsubscribe-Post"]
        message = read(data)
        assert str(message["List-Unsubscribe"]) == f"<{HTTPS}>, <{MAILTO}>"
        assert str(message["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"

    def test_one_uri_as_a_string(self) -> None:
        """A single URI may be a string; without one-click there is no Post field."""
        data = build(list_unsubscribe="mailto:u@shop.example")
        assert b"List-Unsubscribe: <mailto:u@shop.example>\r\n" in head(data)
        assert b"List-Unsubscribe-Post" not in data

    def test_long_uri_on_one_line(self) -> None:
        """An 850-character URL is one unbroken line, never encoded-words."""
        url = "https://shop.example/unsub?token=" + "Ab9-" * 204
        data = build(list_unsubscribe=url)
        assert f"List-Unsubscribe: <{url}>\r\n".encode() in head(data)
        assert str(read(data)["List-Unsubscribe"]) == f"<{url}>"

    @pytest.mark.parametrize(
        "uri",
        [
            "https://shop.example/u?a=?b",  # '=?' without an encoded-word
            "https://shop.example/u?x=%3D%3Futf-8%3Fq%3Fa%3F%3D",  # one, percent-encoded
            "HTTPS://shop.example/u",
            "mailto:u@shop.example?subject=Bye%20now&body=x",
        ],
    )
    def test_tricky_but_valid_uris_are_literal(self, uri: str) -> None:
        """URIs that look encoded are written as they are and read back unchanged."""
        data = build(list_unsubscribe=uri, list_unsubscribe_post=uri.lower().startswith("https"))
        assert f"List-Unsubscribe: <{uri}>\r\n".encode() in head(data)
        assert b"=?utf-8?" not in data
        assert str(read(data)["List-Unsubscribe"]) == f"<{uri}>"

    @pytest.mark.parametrize(
        ("uri", "problem"),
        [
            ("http://shop.example/u", r"only https: and mailto: URIs are allowed.*use https"),
            ("ftp://shop.example/u", "only https: and mailto:"),
            ("javascript:alert(1)", "only https: and mailto:"),
            ("data:text/html,x", "only https: and mailto:"),
            ("//shop.example/u", "only https: and mailto:"),
            ("https:///path-only", "needs a host"),
            ("mailto:?subject=x", "needs an address"),
            ("", "must not be empty"),
            ("https://shop.example/\r\nBcc: evil@attacker.example", "CR or LF"),
            ("https://shop.example/\nx", "CR or LF"),
            ("https://shop.example/\u2028x", "control character"),
            ("https://shop.example/>, <https://evil.example/", "without <>"),
            ("<https://shop.example/u>", "without <>"),
            ("https://shop.example/a b", "' ' is not allowed"),
            ('https://shop.example/"x', "'\"' is not allowed"),
            ("https://shop.example/caf\u00e9", "percent-encoded"),
            (f"https://shop.example/{CRLF_BCC}", "encoded-word"),
            ("https://shop.example/" + "x" * 900, "at most 900"),
        ],
    )
    def test_refused(self, uri: str, problem: str) -> None:
        """Anything but an https/mailto URI is refused, naming the element."""
        error = refused(list_unsubscribe=[MAILTO, uri])
        assert error.field == "list_unsubscribe[1]"
        assert re.search(problem, error.problem), error.problem

    @pytest.mark.parametrize("value", [42, {"url": HTTPS}, [HTTPS, None]])
    def test_wrong_type(self, value: object) -> None:
        """Not a string or a list of strings."""
        assert refused(list_unsubscribe=value).field.startswith("list_unsubscribe")

    def test_one_click_needs_https(self) -> None:
        """list_unsubscribe_post without an https URI is refused (RFC 8058 §3.1)."""
        for fields in ({"list_unsubscribe": MAILTO}, {}):
            error = refused(list_unsubscribe_post=True, **fields)
            assert error.field == "list_unsubscribe_post"
            assert "https" in str(error)

    def test_one_click_is_a_bool(self) -> None:
        """``"yes"`` is not true."""
        error = refused(list_unsubscribe=HTTPS, list_unsubscribe_post="yes")
        assert error.field == "list_unsubscribe_post"

    def test_misspelt_argument(self) -> None:
        """An unknown argument suggests the right one."""
        error = refused(list_unsubscibe=HTTPS)
        assert "did you mean 'list_unsubscribe'" in str(error)

    def test_hand_made_payload_is_checked(self) -> None:
        """The constructor holds a payload made in code to the same rules."""
        base: dict[str, Any] = {"to": ("a@example.org",), "subject": "s", "from_email": SENDER}
        with pytest.raises(InvalidMessageError, match="only https"):
            MailPayload(text="x", list_unsubscribe=("http://x.example/",), **base)
        made = MailPayload(text="x", list_unsubscribe=(HTTPS,), list_unsubscribe_post=True, **base)
        assert made.list_unsubscribe == (HTTPS,)

    def test_signed_by_dkim(self, tmp_path: Path) -> None:
        """With DKIM on, both fields are signed, folded as built, and verify."""
        key = write_ed25519_key(tmp_path / "dkim.pem")
        data = build(list_unsubscribe=[HTTPS, MAILTO], list_unsubscribe_post=True)
        signed = key.signer().sign(data, timestamp=1_700_000_000)
        signed_names = signature_tags(signed)["h"].split(":")
        assert {"list-unsubscribe", "list-unsubscribe-post"} <= set(signed_names)
        assert verifies(signed, key)


class TestInHeaders:
    """``headers={"List-Unsubscribe": ...}`` passes the same checks, written the same way."""

    def test_passes_through_normalised(self) -> None:
        """``<a>,<b>`` is written ``<a>, <b>``; the Post field keeps its one value."""
        headers = {
            "List-Unsubscribe": f"  <{MAILTO}>,<{HTTPS}> ",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
        data = build(headers=headers)
        assert f"List-Unsubscribe: <{MAILTO}>,\r\n <{HTTPS}>\r\n".encode() + ONE_CLICK in data
        assert str(read(data)["List-Unsubscribe"]) == f"<{MAILTO}>, <{HTTPS}>"

    @pytest.mark.parametrize(
        ("headers", "field"),
        [
            ({"List-Unsubscribe": "<http://shop.example/u>"}, "headers['List-Unsubscribe']"),
            ({"List-Unsubscribe": HTTPS}, "headers['List-Unsubscribe']"),  # no <>
            ({"List-Unsubscribe": f"<{HTTPS}> (comment)"}, "headers['List-Unsubscribe']"),
            ({"List-Unsubscribe": ""}, "headers['List-Unsubscribe']"),
            ({"list-unsubscribe": f"<{CRLF_BCC}>"}, "headers['list-unsubscribe']"),
            (
                {"List-Unsubscribe": f"<{HTTPS}>", "List-Unsubscribe-Post": "yes"},
                "headers['List-Unsubscribe-Post']",
            ),
            (
                {
                    "List-Unsubscribe": f"<{MAILTO}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                },
                "headers['List-Unsubscribe-Post']",
            ),
        ],
    )
    def test_refused(self, headers: dict[str, str], field: str) -> None:
        """The argument's rules apply, and the error names the header."""
        assert refused(headers=headers).field == field

    def test_given_twice(self) -> None:
        """A field given as an argument and in headers is refused."""
        twice = refused(list_unsubscribe=HTTPS, headers={"List-Unsubscribe": f"<{HTTPS}>"})
        assert twice.field == "headers['List-Unsubscribe']"
        post = refused(
            list_unsubscribe=HTTPS,
            list_unsubscribe_post=True,
            headers={"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
        )
        assert post.field == "headers['List-Unsubscribe-Post']"

    def test_argument_with_post_in_headers(self) -> None:
        """The URI as an argument and the Post field in headers go together."""
        data = build(
            list_unsubscribe=HTTPS,
            headers={"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
        )
        assert f"List-Unsubscribe: <{HTTPS}>\r\n".encode() in data
        assert data.count(b"List-Unsubscribe-Post:") == 1


class TestDSNOption:
    """The ``dsn`` option of send_mail and send_message is checked before publishing."""

    def test_normalised(self) -> None:
        """Keys are optional; values are upper-cased, repeats dropped, a string split."""
        assert check_dsn("dsn", None) is None
        assert check_dsn("dsn", {}) == DSNOptions((), None, None)
        given = {"notify": ["failure", "DELAY", "Failure"], "ret": "hdrs", "envid": "o-42"}
        assert check_dsn("dsn", given) == DSNOptions(("FAILURE", "DELAY"), "HDRS", "o-42")
        assert check_dsn("dsn", {"notify": "SUCCESS,FAILURE"}) == DSNOptions(
            ("SUCCESS", "FAILURE"), None, None
        )

    def test_taken_by_both_tasks(self) -> None:
        """send_mail and send_message take it; the payloads do not keep it."""
        dsn = {"notify": ["NEVER"], "ret": "FULL", "envid": "x"}
        MailPayload.from_task_kwargs(kwargs_for(dsn=dsn), default_from=SENDER)
        raw = base64.b64encode(b"Subject: x\r\n\r\nHi\r\n").decode()
        RawPayload.from_task_kwargs(
            {"raw_b64": raw, "envelope_from": SENDER, "recipients": ["a@example.org"], "dsn": dsn}
        )

    @pytest.mark.parametrize(
        ("dsn", "field", "problem"),
        [
            ("FAILURE", "dsn", "must be an object"),
            ({"notify": []}, "dsn.notify", "must not be empty"),
            ({"notify": ["NEVER", "FAILURE"]}, "dsn.notify", "NEVER cannot be combined"),
            ({"notify": ["SOMETIMES"]}, "dsn.notify", "not one of NEVER, SUCCESS"),
            ({"notify": [1]}, "dsn.notify", "not one of"),
            ({"notify": {"FAILURE": True}}, "dsn.notify", "must be a list"),
            ({"ret": "BODY"}, "dsn.ret", "FULL or HDRS"),
            ({"ret": 1}, "dsn.ret", "FULL or HDRS"),
            ({"envid": ""}, "dsn.envid", "non-empty string"),
            ({"envid": 42}, "dsn.envid", "non-empty string"),
            ({"envid": "a\r\nRCPT TO:<evil@attacker.example>"}, "dsn.envid", "printable ASCII"),
            ({"envid": "caf\u00e9"}, "dsn.envid", "printable ASCII"),
            ({"envid": "x" * 101}, "dsn.envid", "at most 100"),
            ({"envid": "+" * 34}, "dsn.envid", "at most 100"),  # 102 once xtext-encoded
            ({"retn": "FULL"}, "dsn.retn", "did you mean 'ret'"),
        ],
    )
    def test_refused(self, dsn: object, field: str, problem: str) -> None:
        """Each wrong value names its key; the same holds for send_message."""
        error = refused(dsn=dsn)
        assert error.field == field
        assert problem in str(error)
        raw = base64.b64encode(b"Subject: x\r\n\r\nHi\r\n").decode()
        with pytest.raises(InvalidMessageError) as failure:
            RawPayload.from_task_kwargs(
                {"raw_b64": raw, "envelope_from": "", "recipients": "a@example.org", "dsn": dsn}
            )
        assert failure.value.field == field

    def test_envid_limit_is_the_encoded_length(self) -> None:
        """100 characters once encoded are taken: 33 ``+`` (99) and one more."""
        assert check_dsn("dsn", {"envid": "+" * 33 + "x"}) is not None
