"""The Celery app of benchmarks/perf.py's no-op and django-celery-email workers.

Celery's defaults (prefetch 4, early acknowledgement) with JSON, as a project
adding django-celery-email would have them. ``perf.noop`` does nothing but tell the
sink (one UDP datagram) that it ran, so its end can be timed like a delivery.
"""

import os
import socket

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "perf_django_settings")

import django

django.setup()

from celery import Celery  # noqa: E402

app = Celery("perf", broker=os.environ.get("PERF_BROKER_URL"), include=["djcelery_email.tasks"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)
_udp: list[socket.socket] = []


@app.task(name="perf.noop", ignore_result=True)
def noop(n: int) -> None:
    if not _udp:
        _udp.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    _udp[0].sendto(b"%d" % n, ("127.0.0.1", int(os.environ["PERF_UDP_PORT"])))


# The same, with the delivery guarantees mailworker's tasks carry (late acknowledgement,
# re-queued when the worker is lost, soft and hard time limits), run by a worker with
# prefetch 1 like mailworker's: the ceiling for a task with those guarantees.
@app.task(
    name="perf.noop_guarded",
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    acks_on_failure_or_timeout=False,
    time_limit=240,
    soft_time_limit=216,
)
def noop_guarded(n: int) -> None:
    noop(n)
