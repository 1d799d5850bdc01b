"""Type-checked (not run): the public API as a user would write it.

`make typecheck` runs mypy --strict over this file, so a change that breaks
user code's typing fails the build.
"""

from __future__ import annotations

from mailworker import (
    MailworkerError,
    Profile,
    SendResult,
    SMTPError,
    SMTPRecipientsRefused,
    SMTPSession,
    send_mail,
)


def send_one(message: bytes) -> list[str]:
    profile = Profile.from_url("smtps://app%40example.com:secret@smtp.example.com")
    with SMTPSession(profile) as session:
        result: SendResult = session.send("app@example.com", ["ann@example.org"], message)
        for address, outcome in result.refused.items():
            print(address, outcome.status, outcome.code, outcome.reply)
        print(result.reply.code, result.queue_id)
        return result.accepted


def classify(exc: MailworkerError) -> str:
    if isinstance(exc, SMTPRecipientsRefused):
        return ",".join(exc.refused)
    if isinstance(exc, SMTPError):
        kind = "transient" if exc.is_transient else "permanent"
        return f"{exc.stage} {exc.code} {exc.enhanced_code} {kind}"
    return str(exc)


def from_env() -> Profile:
    return Profile.from_env("bulk", {"MAILWORKER_SMTP_URL_BULK": "smtp://relay.internal:25"})


def enqueue_welcome(address: str) -> str:
    result = send_mail.delay(to=address, subject="Welcome", text="Hi", html="<p>Hi</p>")
    return str(result.id)
