"""What every test server shares: addresses, default credentials, polling, and the
start/stop life cycle as a context manager."""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, TypeVar

#: The only address servers bind to.
LOCALHOST: Final = "127.0.0.1"
#: Name the SMTP servers announce, and a name the good certificate is valid for.
SERVER_HOSTNAME: Final = "localhost"
#: The only name the ``"wrong_host"`` certificate is valid for.
WRONG_HOSTNAME: Final = "wrong.example"
#: Credentials an :class:`~tests.servers.SMTPServer` accepts unless told otherwise.
DEFAULT_USER: Final = "user@example.com"
DEFAULT_PASSWORD: Final = "correct horse battery staple"
DEFAULT_TOKEN: Final = "ya29.test-access-token"
#: A password no server accepts (profile ``wrong``); it must never show up in any output.
WRONG_PASSWORD: Final = "wrong-Pa55word-never-logged"

_T = TypeVar("_T")
_S = TypeVar("_S", bound="Service")


def wait_for(predicate: Callable[[], _T], timeout: float, what: str) -> _T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Raises:
        TimeoutError: it did not within ``timeout`` seconds (``what`` says what for).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


class Service(abc.ABC):
    """Something started with :meth:`start` (which returns it) and stopped with
    :meth:`stop`, also as a context manager."""

    @abc.abstractmethod
    def start(self: _S) -> _S:
        """Start; return self."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop (idempotent)."""

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
