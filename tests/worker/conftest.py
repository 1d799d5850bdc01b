"""Fixtures of the worker tests: a Delivery under test and a worker under test, both
talking to the test's SMTP server and Redis database.

The SMTP server under test is always ``smtpd`` (``tests/conftest.py``): a module sets its
options with ``pytestmark = pytest.mark.smtpd_options(...)``, a test with the same
marker; without one it is clear text without AUTH. Its profiles come from
:func:`tests.servers.profile_urls`, so they follow the server's TLS mode and
credentials.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from mailworker.smtp.profile import Profile
from mailworker.store.limits import Leases
from mailworker.worker.delivery import Delivery
from mailworker.worker.sessions import SessionPool
from mailworker.worker.settings import Settings
from tests.servers import SMTPServer, TLSMaterials, profile_urls, smtp_url
from tests.worker_process import BASE_SETTINGS, WorkerProcess, profile_vars, worker_env

#: The settings every Delivery starts from, as a worker would read them (logs are
#: captured with structlog.testing, so no log format).
BASE_ENV = {k: v for k, v in BASE_SETTINGS.items() if k != "MAILWORKER_LOG_FORMAT"}

#: The type of the ``make_delivery`` fixture.
DeliveryFactory = Callable[..., Delivery]
#: The type of the ``start_worker`` fixture.
WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def not_pem(tmp_path: Path) -> Path:
    """A file that exists but holds no PEM certificate."""
    path = tmp_path / "not-a-ca.pem"
    path.write_text("this is not a certificate\n")
    return path


@pytest.fixture
def make_delivery(
    smtpd: SMTPServer,
    tls_ca: TLSMaterials,
    redis_client: redis.Redis,
    redis_url: str,
    not_pem: Path,
) -> Iterator[DeliveryFactory]:
    """Factory for a Delivery under test, driven directly (no Celery worker).

    ``make_delivery(*, clock=time.time, timeout=5, interrupts=(), **env)`` returns a
    Delivery configured like a worker from :data:`BASE_ENV`, the test's Redis database
    as broker and store, and ``env`` (``MAILWORKER_*`` variables, which win). ``clock``
    and ``interrupts`` go to :class:`Delivery`.

    Profiles, every stage timing out after ``timeout`` seconds:

    - ``default``: to ``smtpd`` in its TLS mode, trusting the test CA, logging in with
      its credentials (AUTH PLAIN) when it offers AUTH;
    - ``wrong``: the same with :data:`~tests.servers.WRONG_PASSWORD` (only when
      ``smtpd`` offers AUTH);
    - ``badca``: STARTTLS to ``smtpd`` with a ``ca_file`` that is not PEM.

    Every session is closed (QUIT) after the test.
    """
    made: list[Delivery] = []

    def create(
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = 5,
        interrupts: tuple[type[BaseException], ...] = (),
        **env: str,
    ) -> Delivery:
        profiles = profile_urls(smtpd, tls_ca.ca_file, timeout=timeout)
        profiles["badca"] = smtp_url(smtpd.port, ca_file=not_pem, timeout=timeout)
        environ = {
            **BASE_ENV,
            "MAILWORKER_BROKER_URL": redis_url,
            **profile_vars(profiles),
            **env,
        }
        pool = SessionPool(
            lambda name: Profile.from_env(name, environ), leases=Leases(redis_client)
        )
        delivery = Delivery(
            Settings.from_env(environ), redis_client, pool, clock=clock, interrupts=interrupts
        )
        made.append(delivery)
        return delivery

    yield create
    for delivery in made:
        delivery.pool.close_all()


@pytest.fixture
def delivery(make_delivery: DeliveryFactory) -> Delivery:
    """A Delivery from ``make_delivery()``: the base settings and the real clock."""
    return make_delivery()


@pytest.fixture
def env(redis_url: str, smtpd: SMTPServer, tls_ca: TLSMaterials) -> dict[str, str]:
    """The environment of a worker under test: :data:`~tests.worker_process.BASE_SETTINGS`
    (JSON logs), the test's Redis database as broker, and profiles to ``smtpd``:
    ``default`` and, when it offers AUTH, ``wrong`` (AUTH LOGIN).

    ``max_messages`` is raised so that 200 messages fit one session per process.
    """
    return worker_env(
        redis_url, profile_urls(smtpd, tls_ca.ca_file, wrong_auth="LOGIN", max_messages=1000)
    )


@pytest.fixture
def start_worker(redis_url: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    """Factory for a worker under test: ``start_worker(env, **options)`` starts a
    :class:`WorkerProcess` (``options`` go to it) logging to ``tmp_path/worker.log``;
    any still running after the test is killed."""
    workers: list[WorkerProcess] = []

    def start(env: dict[str, str], **options: Any) -> WorkerProcess:
        options.setdefault("name", f"mw{len(workers)}")
        worker = WorkerProcess(env, tmp_path / "worker.log", **options)
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        if worker.running:
            worker.kill()
