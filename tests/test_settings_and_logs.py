"""Service settings from the environment (pydantic-settings) and the Redis error-burst log."""

import logging

import pytest

from serving.service import ErrorBurstLog
from serving.settings import ENV, Settings, SettingsError


@pytest.fixture
def clean_env(monkeypatch):
    for name in [*ENV.values(), "LONGER_MODEL"]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_read_the_environment_with_the_same_defaults(clean_env):
    assert Settings.from_env() == Settings()
    assert Settings().key_prefix == "lg" and Settings().max_body_bytes == 4 << 20
    clean_env.setenv("LONGER_THREADS", "3")
    clean_env.setenv("LONGER_KEY_PREFIX", "ab")
    clean_env.setenv("REDIS_URL", "redis://h:1/0")
    clean_env.setenv("LONGER_MODEL", "/old/name")
    s = Settings.from_env(threads=None, max_candidates=7)  # None: the flag was not given
    assert (s.threads, s.key_prefix, s.redis_url, s.model, s.max_candidates) == (
        3,
        "ab",
        "redis://h:1/0",
        "/old/name",
        7,
    )
    clean_env.setenv("LONGER_BUNDLE", "/new/name")
    assert Settings.from_env().model == "/new/name"  # LONGER_BUNDLE wins over the older LONGER_MODEL


@pytest.mark.parametrize(
    "name, value, says",
    [
        ("LONGER_THREADS", "two", "LONGER_THREADS='two'"),
        ("LONGER_WATCH_S", "-1", "LONGER_WATCH_S='-1'"),
        ("LONGER_STATE_PRECISION", "fp8", "LONGER_STATE_PRECISION='fp8'"),
        ("LONGER_LOG_LEVEL", "loud", "LONGER_LOG_LEVEL='loud'"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_variable(clean_env, name, value, says):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError, match=f"^{says}: ") as e:
        Settings.from_env()
    assert isinstance(e.value, ValueError)  # and a LongerError: the CLI prints it in one line


def test_a_bad_flag_value_names_the_setting(clean_env):
    with pytest.raises(SettingsError, match="^threads=-1: "):
        Settings.from_env(threads=-1)


def test_redis_errors_are_logged_as_bursts_not_per_request(caplog):
    now = [0.0]
    burst = ErrorBurstLog(
        logging.getLogger("longer.serving.redis"), "Redis", every_s=10, clock=lambda: now[0]
    )
    with caplog.at_level("WARNING", logger="longer.serving.redis"):
        for i in range(100):  # 100 failing requests in 20 s
            now[0] = i * 0.2
            burst.error(ConnectionError("refused"))
        burst.ok()
        burst.ok()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0] == "Redis failed: ConnectionError: refused"
    assert lines[1].startswith("Redis failed 50 more times in 10 s")
    assert lines[2] == "Redis answers again (49 more failures before that)"
