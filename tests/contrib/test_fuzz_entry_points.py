"""Hostile input through the web entry points: Django's ``EmailMessage`` through
mailworker's ``EmailBackend``, and Flask's ``MailWorker.send``.

Each message either raises a clear error in the caller — :class:`InvalidMessageError`,
Django's ``BadHeaderError``, or whatever Django's own SMTP backend raises for it — or
publishes exactly one task (read back from a real Redis broker) whose payload builds
into exactly the intended message: for Django, the bytes Django's SMTP backend would
send; for Flask, the fields asked for (checked as in tests/message/test_fuzz_payloads.py).

The Django settings are those of tests/contrib/test_django.py (configured once per
process when it is imported), so the two modules can share an xdist worker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import re
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import compat32
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.core import mail
from django.core.mail.message import sanitize_address
from django.test import override_settings
from flask import Flask
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailworker.contrib.flask import MailWorker
from mailworker.errors import InvalidMessageError
from mailworker.message import MailPayload, RawPayload, build_message, message_bytes
from tests.contrib.test_django import BACKEND
from tests.message.test_fuzz_payloads import (
    DEFAULT_FROM,
    HEADER_NAMES,
    HEADER_VALUES,
    MailCase,
    addresses,
    check_mail,
    field_kind,
    fuzz_examples,
    hostile_text,
    mail_cases,
    read,
)

#: Hypothesis settings of both properties: one Redis database per test, emptied between
#: examples by hand (so the function-scoped fixture is fine).
FUZZ = settings(
    max_examples=fuzz_examples(60),
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
#: What a Django message carries that is made anew each time it is serialised.
_VOLATILE = re.compile(rb"^(Date|Message-ID): .*(?:\r\n[ \t].*)*", re.MULTILINE | re.IGNORECASE)


def published(client: redis.Redis, queue: str = "celery") -> list[dict[str, Any]]:
    """The tasks waiting in ``queue`` (their headers and kwargs), oldest first; the
    queue is emptied."""
    raw = client.lrange(queue, 0, -1)
    client.delete(queue)
    tasks = []
    for item in reversed(raw):  # LPUSH: oldest last
        envelope = json.loads(item)
        _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        tasks.append({"name": envelope["headers"]["task"], "kwargs": kwargs})
    return tasks


def mask(data: bytes) -> bytes:
    """``data`` with the values of its Date and Message-ID fields blanked."""
    return _VOLATILE.sub(rb"\1: -", data)


# -- Django ------------------------------------------------------------------------------

_ADDRESS_TEXT = addresses().map(lambda a: a.text)
django_messages = st.fixed_dictionaries(
    {
        "subject": hostile_text,
        "body": st.text(max_size=80),
        "from_email": st.one_of(st.none(), _ADDRESS_TEXT),
        "to": st.lists(_ADDRESS_TEXT, max_size=3),
        "cc": st.lists(_ADDRESS_TEXT, max_size=2),
        "bcc": st.lists(_ADDRESS_TEXT, max_size=2),
        "reply_to": st.lists(_ADDRESS_TEXT, max_size=2),
        "headers": st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3),
    }
)


def django_outcome(fields: dict[str, Any]) -> tuple[bytes | None, BaseException | None]:
    """What Django's own SMTP backend makes of ``fields`` (its ``_send``, step by step):
    the bytes it would send (``random`` seeded, for the Message-ID), or the error it
    raises; (None, None) for a message without recipients."""
    message = mail.EmailMessage(**fields)
    if not message.recipients():
        return None, None
    state = random.getstate()
    try:
        encoding = message.encoding or django_settings.DEFAULT_CHARSET
        sanitize_address(message.from_email, encoding)
        for address in message.recipients():
            sanitize_address(address, encoding)
        random.seed(7)
        return message.message().as_bytes(linesep="\r\n"), None
    except Exception as exc:
        return None, exc
    finally:
        random.setstate(state)


@pytest.fixture
def django_broker(redis_url: str, redis_client: redis.Redis) -> Iterator[redis.Redis]:
    """The Django side publishes to the test's Redis database."""
    with override_settings(EMAIL_BACKEND=BACKEND, MAILWORKER={"BROKER_URL": redis_url}):
        yield redis_client


class TestDjangoBackend:
    """django.core.mail.EmailMessage, hostile in every field, through EmailBackend."""

    @FUZZ
    @given(fields=django_messages)
    def test_clear_error_or_exactly_django_bytes(
        self, django_broker: redis.Redis, fields: dict[str, Any]
    ) -> None:
        """A message Django refuses raises Django's error; one mailworker refuses raises
        InvalidMessageError; any other is published as one send_message task carrying
        Django's bytes and envelope, with no Bcc field, valid as a send_message payload."""
        expected, django_error = django_outcome(fields)
        message = mail.EmailMessage(**fields)
        state = random.getstate()
        raised: Exception | None = None
        try:
            random.seed(7)
            sent = mail.get_connection().send_messages([message])
        except Exception as exc:
            raised = exc
        finally:
            random.setstate(state)
        if raised is not None:
            assert published(django_broker) == []
            if isinstance(raised, InvalidMessageError):
                assert expected is not None  # Django would have sent it
                event(f"refused by mailworker: {field_kind(raised.field)}")
            else:
                # Django's own error (BadHeaderError, "Invalid address" ValueError, ...),
                # as its SMTP backend raises it.
                assert type(raised) is type(django_error), repr(raised)
                event(f"refused by Django: {type(raised).__name__}")
            return
        assert django_error is None
        tasks = published(django_broker)
        if not message.recipients():
            assert (sent, tasks) == (0, [])
            event("no recipients")
            return
        event("published")
        [task] = tasks
        assert sent == 1
        assert task["name"] == "mailworker.send_message"
        kwargs = task["kwargs"]
        raw = base64.b64decode(kwargs["raw_b64"])
        assert expected is not None
        assert mask(raw) == mask(expected)
        payload = RawPayload.from_task_kwargs(kwargs)
        assert (payload.envelope_from, list(payload.recipients)) == (
            kwargs["envelope_from"],
            kwargs["recipients"],
        )
        assert 1 <= len(payload.recipients) <= len(message.recipients())
        names = [n.lower() for n in BytesParser(policy=compat32).parsebytes(raw)]
        assert "bcc" not in names


# -- Flask -------------------------------------------------------------------------------


def flask_arguments(case: MailCase) -> dict[str, Any] | None:
    """``MailWorker.send`` arguments for a send_mail case (attachment content as bytes,
    or as text when it is not base64); None for what the API's types rule out
    (attachments that are not a list of objects, a list_unsubscribe that is no URI or
    list)."""
    arguments = dict(case.kwargs)
    arguments.setdefault("to", [])  # a required argument
    if not isinstance(arguments.get("list_unsubscribe", ""), (str, list)):
        return None
    attachments = arguments.get("attachments")
    if attachments is None:
        return arguments
    if not isinstance(attachments, list) or not all(isinstance(a, dict) for a in attachments):
        return None
    converted = []
    for item in attachments:
        spec = dict(item)
        with contextlib.suppress(ValueError):  # else sent as text, UTF-8
            spec["content"] = base64.b64decode(spec["content"], validate=True)
        converted.append(spec)
    arguments["attachments"] = converted
    return arguments


#: The extension, bound to each test's app (the app-factory pattern).
flask_mail = MailWorker()


@pytest.fixture
def flask_app(redis_url: str) -> Flask:
    """An app whose MailWorker publishes to the test's Redis database."""
    app = Flask(__name__)
    app.config.update(MAILWORKER_BROKER_URL=redis_url, MAILWORKER_DEFAULT_FROM=DEFAULT_FROM)
    flask_mail.init_app(app)
    return app


class TestFlaskExtension:
    """MailWorker.send, hostile in every argument."""

    @FUZZ
    @given(case=mail_cases())
    def test_invalid_or_exactly_the_fields_asked_for(
        self, flask_app: Flask, redis_client: redis.Redis, case: MailCase
    ) -> None:
        """send() raises InvalidMessageError before publishing, or publishes one
        send_mail task whose payload builds into exactly the intended message."""
        arguments = flask_arguments(case)
        if arguments is None:
            event("not an API input")
            return
        with flask_app.app_context():
            try:
                flask_mail.send(**arguments)
            except InvalidMessageError as exc:
                event(f"invalid: {field_kind(exc.field)}")
                assert published(redis_client) == []
                return
        event("published")
        [task] = published(redis_client)
        assert task["name"] == "mailworker.send_mail"
        kwargs = task["kwargs"]
        assert kwargs.pop("profile") == "default"
        payload = MailPayload.from_task_kwargs(kwargs, default_from=DEFAULT_FROM)
        data = message_bytes(build_message(payload))
        check_mail(read(data), payload, case)
