"""The test servers this suite relies on behave under the faults the suite produces."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from tests.servers import SMTPServer

SMTPFactory = Callable[..., SMTPServer]


class TestServerStop:
    """Stopping a server never hangs, whatever state its clients are in."""

    def test_stop_while_client_mid_starttls(self, smtp_server: SMTPFactory) -> None:
        """stop() returns promptly while a client has sent STARTTLS but not yet its TLS hello.

        This is the state a client that rejects the server's certificate leaves behind
        for a moment; a test that stops the server right after such a failure hits it.
        """
        server = smtp_server(tls="starttls")
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            reader = sock.makefile("rb")
            try:
                assert reader.readline().startswith(b"220")
                sock.sendall(b"EHLO client.example\r\n")
                while reader.readline()[3:4] == b"-":
                    pass
                sock.sendall(b"STARTTLS\r\n")
                assert reader.readline().startswith(b"220")
                start = time.monotonic()
                server.stop()  # raises TimeoutError after 5 s if the connection is never let go
                assert time.monotonic() - start < 2
            finally:
                reader.close()
