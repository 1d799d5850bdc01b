"""Domains in addresses are written as IDNA 2008 A-labels."""

from __future__ import annotations

import pytest

from mailworker.errors import InvalidMessageError
from mailworker.message import MailPayload


def recipients(to: str) -> tuple[str, ...]:
    """The envelope recipients of a message to ``to``."""
    payload = MailPayload.from_task_kwargs(
        {"to": to, "subject": "s", "text": "t"}, default_from="shop@example.com"
    )
    return payload.recipients


class TestIDNA2008:
    """Non-ASCII domains follow IDNA 2008, not the stdlib's IDNA 2003."""

    def test_sharp_s_is_kept(self) -> None:
        """'straße.de' is its own domain (xn--strae-oqa.de), not 'strasse.de'."""
        assert recipients("ann@straße.de") == ("ann@xn--strae-oqa.de",)

    def test_case_is_folded_in_unicode_labels(self) -> None:
        """Upper-case Unicode labels map to the same A-label as lower-case ones."""
        assert recipients("ann@BÜCHER.example") == ("ann@xn--bcher-kva.example",)

    def test_ascii_domain_keeps_its_case(self) -> None:
        """An ASCII domain is passed as given (servers compare it case-insensitively)."""
        assert recipients("ann@Example.org") == ("ann@Example.org",)

    def test_invalid_label_names_the_field(self) -> None:
        """A label IDNA 2008 forbids is an invalid address of the field that holds it."""
        with pytest.raises(InvalidMessageError) as caught:
            recipients("ann@☃-⌘.example")
        assert caught.value.field == "to"
        assert "not a valid domain name" in str(caught.value)
