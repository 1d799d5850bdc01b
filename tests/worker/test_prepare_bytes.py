"""The message bytes come out the same whatever header classes the email package
uses: mailworker's policies differ from the standard ones only in building each
header class once (mailworker.message._registry)."""

from __future__ import annotations

import base64
from email import policy as email_policy
from typing import Any

import pytest

from mailworker.message import _mime
from mailworker.queue.names import SEND_MAIL
from mailworker.worker.outcome import Meta
from mailworker.worker.prepare import prepare

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256))).decode()
PAYLOADS: dict[str, dict[str, Any]] = {
    "plain": {"to": "ann@example.org", "subject": "Hello", "text": "Hi Ann\n.\nBye"},
    "html, inline image and attachment": {
        "to": ["Ann Example <ann@example.org>", "bob@example.org"],
        "cc": "carol@example.org",
        "reply_to": "help@example.com",
        "subject": "Your invoice",
        "text": "Attached.",
        "html": '<p>Attached.</p><img src="cid:logo">',
        "headers": {"X-Invoice": "2026-0042"},
        "attachments": [
            {"filename": "invoice.pdf", "content": PNG, "mimetype": "application/pdf"},
            {"filename": "logo.png", "content": PNG, "content_id": "logo"},
            {"filename": "Résumé \u2013 final.txt", "content": PNG},
        ],
        "list_unsubscribe": ["https://example.com/unsub?u=42", "mailto:unsub@example.com"],
        "list_unsubscribe_post": True,
    },
    "non-ASCII headers": {
        "to": "Zoë Ünïcode <zoe@example.org>",
        "from_email": "Ælfred <app@example.com>",
        "subject": "Grüße aus Köln — " + "lang " * 30,
        "text": "Schöne Grüße",
    },
    "SMTPUTF8 address": {"to": "用户@例子.广告", "subject": "你好", "text": "你好"},
}


def _bytes(kwargs: dict[str, Any]) -> bytes:
    meta: Meta = {
        "key": "same-key",
        "origin": "same-origin",
        "first_attempt_at": 1_700_000_000.0,
        "date": "Tue, 14 Nov 2023 22:13:20 +0000",
    }
    prepared = prepare(
        SEND_MAIL,
        dict(kwargs),
        meta,
        default_from="App <app@example.com>",
        check_profile=lambda _name: None,
    )
    return prepared.data


@pytest.mark.parametrize("kwargs", PAYLOADS.values(), ids=list(PAYLOADS))
def test_same_bytes_as_the_standard_policies(
    kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = _bytes(kwargs)
    monkeypatch.setattr(_mime, "_POLICY", email_policy.SMTP.clone(cte_type="7bit"))
    monkeypatch.setattr(_mime, "_POLICY_UTF8", email_policy.SMTPUTF8.clone(cte_type="7bit"))
    standard = _bytes(kwargs)
    assert ours == standard
    assert b"Message-ID:" in ours
