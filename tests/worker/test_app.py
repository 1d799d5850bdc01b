"""Which app publishes and which settings a worker's tasks run with."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery

from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.worker import app as worker_app
from mailworker.worker.app import (
    configure,
    ensure_limits,
    env_settings,
    publishing_app,
    settings_of,
)
from mailworker.worker.settings import Settings

SETTINGS = Settings(broker_url="memory://", visibility_timeout=100, task_time_limit=30)


@pytest.fixture(autouse=True)
def publishing_restored() -> Iterator[None]:
    """configure() makes an app the publishing one: put the previous one back after."""
    previous = list(worker_app._publishing)
    yield
    worker_app._publishing[:] = previous


def project_app(name: str) -> Celery:
    """A project's app that includes mailworker's tasks, finalized."""
    app = Celery(name, broker="memory://", set_as_current=False, include=["mailworker.tasks"])
    app.loader.import_default_modules()
    app.finalize()
    return app


class TestPublishingApp:
    """send_mail.delay publishes through the last configured app."""

    def test_last_configured_app_publishes(self) -> None:
        """The app most recently passed to configure() is the publishing app, and
        mailworker.send_mail resolves to its task."""
        from mailworker import send_mail  # noqa: PLC0415

        first, second = Celery("first"), Celery("second")
        configure(first, SETTINGS)
        configure(second, SETTINGS)
        assert publishing_app() is second
        assert send_mail.app is second
        assert send_mail.name == SEND_MAIL

    def test_without_configure_mailworkers_own_app(self) -> None:
        """With no configured app, mailworker's own app for the environment's broker is
        made once and reused."""
        worker_app._publishing.clear()
        made = publishing_app()
        assert made.main == "mailworker"
        assert made.conf.broker_url == env_settings().broker_url
        assert publishing_app() is made


class TestSettingsOfAnApp:
    """Tasks run with their app's settings; unconfigured apps get the environment's."""

    def test_configured_settings(self) -> None:
        """configure(app, settings) records the settings and the tasks' time limits."""
        app = project_app("configured")
        configure(app, SETTINGS, broker=False)
        assert settings_of(app) is SETTINGS
        for name in (SEND_MAIL, SEND_MESSAGE):
            assert (app.tasks[name].time_limit, app.tasks[name].soft_time_limit) == (30, 27)

    def test_unconfigured_app_gets_the_environments_limits_at_worker_start(self) -> None:
        """A project that never called configure() still runs the tasks with a hard and
        soft time limit (the environment's) once its worker starts."""
        app = project_app("unconfigured")
        assert app.tasks[SEND_MAIL].time_limit is None
        ensure_limits(app)
        limit = env_settings().task_time_limit
        assert app.tasks[SEND_MAIL].time_limit == limit
        assert app.tasks[SEND_MESSAGE].soft_time_limit == pytest.approx(limit * 0.9)
        assert settings_of(app) is env_settings()
