"""Message bodies on the wire: CRLF only, dot-stuffed, nothing can end DATA early."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from mailworker.smtp.body import dot_stuff, normalise_line_endings


def unstuff(wire: bytes) -> bytes:
    """What an RFC 5321 server makes of the DATA payload (without the end marker)."""
    assert wire.endswith(b"\r\n.\r\n")
    lines = wire[: -len(b".\r\n")].split(b"\r\n")[:-1]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


class TestNormalisation:
    def test_bare_lf_and_cr_become_crlf(self) -> None:
        """Bare LF and bare CR are turned into CRLF."""
        assert normalise_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"

    def test_lone_dots_are_stuffed(self) -> None:
        """A line holding only a dot is sent as two dots."""
        assert dot_stuff(b"a\n.\nb") == b"a\r\n..\r\nb\r\n.\r\n"

    def test_smuggling_sequences_cannot_end_data(self) -> None:
        """<LF>.<LF>, <CR>.<CR> and <LF>.<CR><LF> never reach the wire as an end marker."""
        for attack in (b"x\n.\nMAIL FROM:<evil>\n", b"x\r.\rRCPT", b"x\n.\r\nQUIT\r\n"):
            wire = dot_stuff(attack)
            assert wire.count(b"\r\n.\r\n") == 1
            assert wire.endswith(b"\r\n.\r\n")


# Bodies built from the characters that matter to SMTP framing.
framing = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b" ", b"\x80", b".."]), max_size=60
).map(b"".join)


class TestProperties:
    @given(framing)
    def test_only_crlf_line_endings_on_the_wire(self, body: bytes) -> None:
        """After stuffing, every CR is followed by LF and every LF preceded by CR."""
        wire = dot_stuff(body)
        assert not re.search(rb"\r(?!\n)|(?<!\r)\n", wire)

    @given(framing)
    def test_exactly_one_end_marker_at_the_end(self, body: bytes) -> None:
        """The end-of-data sequence occurs once, at the very end."""
        wire = dot_stuff(b"\r\n" + body)
        assert wire.find(b"\r\n.\r\n") == len(wire) - 5

    @given(framing)
    def test_server_recovers_the_normalised_message(self, body: bytes) -> None:
        """Un-stuffing the wire bytes gives back the message with CRLF line endings."""
        assert unstuff(dot_stuff(body)) == normalise_line_endings(body)
