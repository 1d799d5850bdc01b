"""Which app publishes and which settings a worker's tasks run with."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery

from mailworker.errors import ConfigError
from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.queue.producer import producer_app
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


class TestBrokers:
    """What changes with RabbitMQ as the broker: the store's URL, the result backend, and
    the timeout the task time limit must stay below."""

    RABBIT = "amqp://mail:s3cret-pass@rabbit.internal:5672/mail"
    STORE = "redis://store.internal:6379/2"

    def test_rabbitmq_broker_needs_the_store_url(self) -> None:
        """With an amqp:// broker and no MAILWORKER_REDIS_URL, reading the settings fails
        with an error that names the variable and the broker's scheme, not its password."""
        with pytest.raises(ConfigError) as failure:
            Settings.from_env({"MAILWORKER_BROKER_URL": self.RABBIT})

        message = str(failure.value)
        assert message.startswith("MAILWORKER_REDIS_URL: the broker is amqp://")
        assert "s3cret" not in message

    def test_redis_broker_is_the_default_store_and_result_backend(self) -> None:
        """A Redis broker is also the store and the result backend unless told otherwise;
        a separate store leaves the results on the broker, where they always were."""
        alone = Settings.from_env({"MAILWORKER_BROKER_URL": "redis://broker:6379/0"})
        both = Settings.from_env(
            {"MAILWORKER_BROKER_URL": "redis://broker:6379/0", "MAILWORKER_REDIS_URL": self.STORE}
        )

        assert alone.redis_url == alone.result_backend == "redis://broker:6379/0"
        assert (both.redis_url, both.result_backend) == (self.STORE, "redis://broker:6379/0")

    def test_rabbitmq_app_keeps_results_in_the_store(self) -> None:
        """configure() points an app at RabbitMQ for tasks and at MAILWORKER_REDIS_URL for
        results (Celery has no amqp:// result backend)."""
        settings = Settings.from_env(
            {"MAILWORKER_BROKER_URL": self.RABBIT, "MAILWORKER_REDIS_URL": self.STORE}
        )
        app = configure(Celery("rabbit", set_as_current=False), settings)

        assert app.conf.broker_url == self.RABBIT
        assert app.conf.result_backend == self.STORE
        assert type(app.backend).__name__ == "RedisBackend"

    def test_producer_for_rabbitmq_keeps_no_results(self) -> None:
        """A producer made for an amqp:// URL publishes without a result backend; one for
        a Redis broker reads results from it."""
        rabbit = producer_app("amqp://guest@producer-test.invalid:5672//")
        redis_app = producer_app("redis://producer-test.invalid:6379/4")

        assert rabbit.conf.result_backend is None
        assert type(rabbit.backend).__name__ == "DisabledBackend"
        assert redis_app.conf.result_backend == "redis://producer-test.invalid:6379/4"

    @pytest.mark.parametrize(
        ("env", "problem"),
        [
            ({"MAILWORKER_TASK_TIME_LIMIT": "900"}, "MAILWORKER_CONSUMER_TIMEOUT"),
            ({"MAILWORKER_TASK_TIME_LIMIT": "900", "MAILWORKER_CONSUMER_TIMEOUT": "3600"}, None),
            # The visibility timeout is the Redis broker's: RabbitMQ ignores it.
            ({"MAILWORKER_TASK_TIME_LIMIT": "400", "MAILWORKER_VISIBILITY_TIMEOUT": "600"}, None),
        ],
    )
    def test_time_limit_stays_below_half_the_consumer_timeout(
        self, env: dict[str, str], problem: str | None
    ) -> None:
        """With RabbitMQ the hard task time limit must be below half of its consumer
        timeout (MAILWORKER_CONSUMER_TIMEOUT, default 1800 s), not of the visibility
        timeout."""
        env = {"MAILWORKER_BROKER_URL": self.RABBIT, "MAILWORKER_REDIS_URL": self.STORE, **env}
        if problem is None:
            assert Settings.from_env(env).task_time_limit == float(
                env["MAILWORKER_TASK_TIME_LIMIT"]
            )
        else:
            with pytest.raises(ConfigError, match=problem):
                Settings.from_env(env)

    def test_redis_broker_still_checks_the_visibility_timeout(self) -> None:
        """The same 400 s limit with a Redis broker and a 600 s visibility timeout is
        refused, naming MAILWORKER_VISIBILITY_TIMEOUT."""
        with pytest.raises(ConfigError, match="MAILWORKER_VISIBILITY_TIMEOUT"):
            Settings.from_env(
                {"MAILWORKER_TASK_TIME_LIMIT": "400", "MAILWORKER_VISIBILITY_TIMEOUT": "600"}
            )
