"""Real servers on 127.0.0.1 for the tests, each on a free port chosen at start.

- :class:`TLSMaterials` (:mod:`.tls`): a throw-away ``trustme`` CA, a good server
  certificate and three bad ones (wrong host name, untrusted CA, expired).
- :class:`SMTPServer` (:mod:`.smtp`): an aiosmtpd server in a thread, built on the
  development server's plumbing (:mod:`mailworker.dev._smtp`), with a
  :class:`RecordingHandler` (:mod:`.recording`) that records every message and
  connection and injects faults (per-recipient replies, 4xx once, slow replies, extra
  EHLO keywords), plus AUTH LOGIN, PLAIN, CRAM-MD5 and XOAUTH2 (:mod:`.auth`).
- :class:`ScriptedServer` (:mod:`.scripted`): a raw TCP server driven by a Python
  function, for faults a real server never produces.
- :class:`RedisServer` (:mod:`.redis_server`): a private ``redis-server`` subprocess,
  clear text or TLS only, with a password or an ACL user if asked.
- :class:`SentinelGroup` (:mod:`.sentinel`): a primary, a replica and three sentinels
  (:class:`SentinelServer`), with a failover on demand.
- :class:`RabbitMQServer` (:mod:`.rabbitmq`): a private ``rabbitmq-server`` node, one
  fresh virtual host per test.
- :func:`smtp_url` and :func:`profile_urls` (:mod:`.urls`): profile URLs for them.

Nothing here imports pytest; the fixtures are in ``tests/conftest.py``.
"""

from mailworker.dev.server import TLSMode, free_port
from tests.servers.auth import (
    ALL_MECHANISMS,
    XOAUTH2_ERROR,
    XOAUTH2_FAILURE_REPLY,
    AuthAttempt,
    xoauth2_string,
)
from tests.servers.base import (
    DEFAULT_PASSWORD,
    DEFAULT_TOKEN,
    DEFAULT_USER,
    LOCALHOST,
    SERVER_HOSTNAME,
    WRONG_HOSTNAME,
    WRONG_PASSWORD,
    wait_for,
)
from tests.servers.rabbitmq import RabbitMQServer
from tests.servers.recording import ReceivedMessage, RecordingHandler
from tests.servers.redis_server import RedisServer
from tests.servers.scripted import ClientClosed, Script, ScriptConnection, ScriptedServer
from tests.servers.sentinel import SentinelGroup, SentinelServer
from tests.servers.smtp import SMTPServer
from tests.servers.tls import CertChoice, TLSMaterials
from tests.servers.urls import profile_urls, smtp_url

__all__ = [
    "ALL_MECHANISMS",
    "DEFAULT_PASSWORD",
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "LOCALHOST",
    "SERVER_HOSTNAME",
    "WRONG_HOSTNAME",
    "WRONG_PASSWORD",
    "XOAUTH2_ERROR",
    "XOAUTH2_FAILURE_REPLY",
    "AuthAttempt",
    "CertChoice",
    "ClientClosed",
    "RabbitMQServer",
    "ReceivedMessage",
    "RecordingHandler",
    "RedisServer",
    "SMTPServer",
    "Script",
    "ScriptConnection",
    "ScriptedServer",
    "SentinelGroup",
    "SentinelServer",
    "TLSMaterials",
    "TLSMode",
    "free_port",
    "profile_urls",
    "smtp_url",
    "wait_for",
    "xoauth2_string",
]
