"""The email package's header registry, with each header class built once.

``email.headerregistry.HeaderRegistry.__getitem__`` builds a new class with
``type()`` for every header it parses or stores — about twenty per message, the
largest single cost of building one. The classes it builds for a name are all
alike, so one per name is kept; the policies below are the standard ones with
that registry and nothing else changed (the bytes written are the same).
"""

from __future__ import annotations

from collections import OrderedDict
from email import policy as email_policy
from email.headerregistry import BaseHeader, HeaderRegistry
from typing import Final


class _CachedRegistry(HeaderRegistry):
    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


class _ParsedRegistry(_CachedRegistry):
    """Also keeps the last few hundred parsed headers, by name and value: for reading
    serialised header blocks back (:func:`mailworker.message._wire.header_mismatch`),
    where the same fields (From, Content-Type, MIME-Version, …) come back message after
    message. The header objects are immutable; they are only read there."""

    #: Enough for the fields that repeat; the parse trees are heavy (~5 KB each).
    _SIZE = 256

    def __init__(self) -> None:
        super().__init__()
        self._parsed: OrderedDict[tuple[str, str], BaseHeader] = OrderedDict()

    def __call__(self, name: str, value: str) -> BaseHeader:
        key = (name.lower(), value)
        found = self._parsed.get(key)
        if found is None:
            found = super().__call__(name, value)
            self._parsed[key] = found
            if len(self._parsed) > self._SIZE:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(key)
        return found


_REGISTRY: Final = _CachedRegistry()

#: ``email.policy.default``, ``SMTP`` and ``SMTPUTF8`` with the cached registry.
DEFAULT: Final = email_policy.default.clone(header_factory=_REGISTRY)
SMTP: Final = email_policy.SMTP.clone(header_factory=_REGISTRY)
SMTPUTF8: Final = email_policy.SMTPUTF8.clone(header_factory=_REGISTRY)
#: ``email.policy.default`` for reading back what was written (see _ParsedRegistry).
READ_BACK: Final = email_policy.default.clone(header_factory=_ParsedRegistry())
