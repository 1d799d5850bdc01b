"""Redis over TLS, end to end: a real ``mailworker worker`` whose broker, result backend
and store are a TLS-only ``redis-server`` (``--port 0 --tls-port``) that admits one ACL
user with a password; the URLs verify its certificate (``rediss://…?ssl_cert_reqs=
required&ssl_ca_certs=…``)."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

from mailworker.errors import PublishError
from mailworker.queue.names import SEND_MAIL
from mailworker.queue.producer import Producer, producer_app, verified_url
from mailworker.store.client import redis_client
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.app import configure
from mailworker.worker.settings import Settings
from mailworker.worker.tasks import send_mail
from tests.servers import RedisServer, SMTPServer, TLSMaterials, profile_urls, wait_for
from tests.worker_process import WorkerProcess, mailworker_executable, producer, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.smtpd_options(tls="starttls", auth=True)]

#: The ACL user and its password (characters that must be escaped in a URL).
USER, PASSWORD = "mailworker", "tls-Pa55:w/rd@"


@pytest.fixture
def tls_redis(tls_ca: TLSMaterials) -> Iterator[RedisServer]:
    """A TLS-only Redis of this test's own, admitting only :data:`USER`."""
    with RedisServer(tls=tls_ca, user=USER, password=PASSWORD) as server:
        yield server


class TestURLs:
    """What the Celery side makes of rediss:// URLs (no connection)."""

    def test_cert_reqs_added_when_missing(self) -> None:
        """A rediss:// URL without ssl_cert_reqs gets ``required``; others are kept."""
        assert verified_url("rediss://h:6380/0?ssl_ca_certs=/ca.pem") == (
            "rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
        )
        assert verified_url("rediss://h/0") == "rediss://h/0?ssl_cert_reqs=required"
        kept = "rediss://h/0?ssl_cert_reqs=CERT_OPTIONAL"
        assert verified_url(kept) == kept
        assert verified_url("redis://h/0") == "redis://h/0"

    def test_configure_uses_it_for_broker_and_results(self) -> None:
        """configure() points broker and result backend at the verifying URL."""
        app = configure(
            Celery("t", set_as_current=False),
            Settings(broker_url="rediss://h:6380/0?ssl_ca_certs=/ca.pem"),
        )
        expected = "rediss://h:6380/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
        assert app.conf.broker_url == app.conf.result_backend == expected


class TestOverTLS:
    """Broker, results and store over verified TLS, as an ACL user."""

    def test_batch_with_dead_letter_and_retry(
        self,
        tls_redis: RedisServer,
        smtpd: SMTPServer,
        tls_ca: TLSMaterials,
        start_worker: Callable[..., WorkerProcess],
    ) -> None:
        """Every message arrives and its result comes back; a 550 is dead-lettered and a
        451 comes back through the retry schedule; ``mailworker dlq`` reads the store."""
        smtpd.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
        smtpd.handler.rcpt_replies_once["grey@example.org"] = "451 4.7.1 greylisted"
        env = worker_env(
            tls_redis.url_for(0),
            profile_urls(smtpd, tls_ca.ca_file),
            MAILWORKER_REDIS_URL=tls_redis.url_for(1),
        )
        worker = start_worker(env)
        with producer(env):
            sent = [
                send_mail.delay(to=f"user{n}@example.org", subject=f"tls {n}", text="hi")
                for n in range(8)
            ]
            grey = send_mail.delay(to="grey@example.org", subject="tls grey", text="hi")
            bad = send_mail.delay(to="bad@example.org", subject="tls bad", text="hi")
            assert [r.get(timeout=20)["status"] for r in sent] == ["sent"] * 8
            assert grey.get(timeout=10)["status"] == "deferred"
            wait_for(bad.ready, 10, "the 550 to be dead-lettered")
            smtpd.handler.wait_for_messages(9, timeout=15)
        store = redis_client(tls_redis.url_for(1))
        with contextlib.closing(store):
            wait_for(lambda: RetrySchedule(store).pending() == 0, 10, "the retry to be sent")
            [record] = DeadLetterStore(store).list()
        worker.stop()

        subjects = sorted(str(m.parsed()["Subject"]) for m in smtpd.handler.messages)
        assert subjects == sorted([f"tls {n}" for n in range(8)] + ["tls grey"])
        assert record.subject == "tls bad"
        listed = subprocess.run(
            [mailworker_executable(), "dlq", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert [json.loads(line)["subject"] for line in listed.stdout.splitlines()] == ["tls bad"]
        assert PASSWORD not in worker.output()

    def test_unverified_server_is_refused(self, tls_redis: RedisServer, tmp_path: Path) -> None:
        """A broker URL whose CA did not sign the server's certificate fails to publish
        (PublishError), also without ssl_cert_reqs: never an unverified connection."""
        other_ca = TLSMaterials(tmp_path).ca_file
        url = tls_redis.url.split("?")[0] + f"?ssl_ca_certs={other_ca}"
        producer_ = Producer(producer_app(url))
        kwargs = {"to": "a@example.org", "subject": "s", "text": "t"}
        with pytest.raises(PublishError, match="CERTIFICATE_VERIFY_FAILED"):
            producer_.publish(SEND_MAIL, kwargs, store_result=False)  # the broker
        with pytest.raises(PublishError, match="result store"):
            producer_.publish(SEND_MAIL, kwargs)  # the result backend, first
