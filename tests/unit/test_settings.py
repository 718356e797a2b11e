"""Settings read from BEELDPORTAAL_* variables: defaults, prefixes, the pseudonym key, secrets."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from pydantic import SecretStr, ValidationError

from shared.settings import (
    KafkaSettings,
    PostgresSettings,
    PrivacySettings,
    S3Settings,
    ServiceSettings,
)

SetEnv = Callable[..., None]
KEY_32 = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without BEELDPORTAAL_* variables, whatever the developer's shell has."""
    for name in list(os.environ):
        if name.upper().startswith("BEELDPORTAAL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def setenv(monkeypatch: pytest.MonkeyPatch) -> Iterator[SetEnv]:
    def _setenv(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    yield _setenv


class TestDefaults:
    def test_a_service_runs_against_the_local_platform_without_any_variable(self) -> None:
        settings = ServiceSettings()
        assert settings.service_name == "beeldportaal"
        assert settings.log_level == "INFO"
        assert settings.log_json is True
        assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
        assert settings.s3.endpoint == "127.0.0.1:19000"
        assert settings.s3.bucket == "dicom"
        assert settings.s3.secure is False
        assert (
            settings.postgres.conninfo == "postgresql://beeldportaal@127.0.0.1:15432/beeldportaal"
        )

    def test_kafka_producer_defaults_allow_large_study_events(self) -> None:
        kafka = KafkaSettings()
        assert kafka.max_message_bytes == 16 * 1024 * 1024
        assert kafka.compression == "zstd"
        assert kafka.max_batch_bytes == 256 * 1024
        assert kafka.client_id_prefix == "beeldportaal"
        assert kafka.request_timeout_ms == 30_000

    def test_each_settings_object_gets_its_own_nested_platform_settings(self) -> None:
        assert ServiceSettings().kafka is not ServiceSettings().kafka


class TestEnvironmentOverrides:
    def test_service_variables_use_the_plain_prefix(self, setenv: SetEnv) -> None:
        setenv(
            BEELDPORTAAL_SERVICE_NAME="consent",
            BEELDPORTAAL_LOG_LEVEL="DEBUG",
            BEELDPORTAAL_LOG_JSON="false",
        )
        settings = ServiceSettings()
        assert (settings.service_name, settings.log_level, settings.log_json) == (
            "consent",
            "DEBUG",
            False,
        )

    def test_kafka_variables_use_the_kafka_prefix_also_inside_service_settings(
        self, setenv: SetEnv
    ) -> None:
        setenv(
            BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS="kafka-0:9092,kafka-1:9092",
            BEELDPORTAAL_KAFKA_MAX_MESSAGE_BYTES="1048576",
            BEELDPORTAAL_KAFKA_COMPRESSION="snappy",
        )
        kafka = ServiceSettings().kafka
        assert kafka.bootstrap_servers == "kafka-0:9092,kafka-1:9092"
        assert kafka.max_message_bytes == 1_048_576
        assert kafka.compression == "snappy"

    def test_s3_variables_use_the_s3_prefix(self, setenv: SetEnv) -> None:
        setenv(
            BEELDPORTAAL_S3_ENDPOINT="s3.example.nl",
            BEELDPORTAAL_S3_SECURE="true",
            BEELDPORTAAL_S3_BUCKET="images",
            BEELDPORTAAL_S3_SECRET_KEY="s3-secret",
        )
        s3 = ServiceSettings().s3
        assert (s3.endpoint, s3.secure, s3.bucket) == ("s3.example.nl", True, "images")
        assert s3.secret_key.get_secret_value() == "s3-secret"

    def test_postgres_variables_use_the_postgres_prefix(self, setenv: SetEnv) -> None:
        setenv(BEELDPORTAAL_POSTGRES_DSN="postgresql://timeline@db:5432/timeline")
        assert PostgresSettings().conninfo == "postgresql://timeline@db:5432/timeline"
        assert ServiceSettings().postgres.conninfo == "postgresql://timeline@db:5432/timeline"

    def test_a_variable_with_another_prefix_does_not_leak_into_a_section(
        self, setenv: SetEnv
    ) -> None:
        # BEELDPORTAAL_BUCKET is not BEELDPORTAAL_S3_BUCKET, and unprefixed names are ignored.
        setenv(
            BEELDPORTAAL_BUCKET="wrong",
            BEELDPORTAAL_BOOTSTRAP_SERVERS="wrong:1",
            BOOTSTRAP_SERVERS="wrong:2",
            LOG_LEVEL="ERROR",
        )
        settings = ServiceSettings()
        assert settings.s3.bucket == "dicom"
        assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
        assert settings.log_level == "INFO"

    def test_variables_are_read_when_the_object_is_made_not_at_import(self, setenv: SetEnv) -> None:
        before = S3Settings()
        setenv(BEELDPORTAAL_S3_BUCKET="later")
        assert before.bucket == "dicom"
        assert S3Settings().bucket == "later"

    def test_explicit_arguments_win_over_the_environment(self, setenv: SetEnv) -> None:
        setenv(BEELDPORTAAL_KAFKA_BOOTSTRAP_SERVERS="from-env:9092")
        assert KafkaSettings(bootstrap_servers="given:9092").bootstrap_servers == "given:9092"

    @pytest.mark.parametrize(
        ("name", "value"),
        [("BEELDPORTAAL_KAFKA_MAX_MESSAGE_BYTES", "lots"), ("BEELDPORTAAL_S3_SECURE", "maybe")],
    )
    def test_a_malformed_value_fails_at_startup(
        self, setenv: SetEnv, name: str, value: str
    ) -> None:
        setenv(**{name: value})
        with pytest.raises(ValidationError):
            ServiceSettings()


class TestBootstrapList:
    @pytest.mark.parametrize(
        ("servers", "expected"),
        [
            ("127.0.0.1:9092", ["127.0.0.1:9092"]),
            ("a:9092,b:9092", ["a:9092", "b:9092"]),
            (" a:9092 , b:9092 ,, ", ["a:9092", "b:9092"]),
            ("", []),
            (" , ", []),
        ],
    )
    def test_the_comma_separated_servers_become_a_clean_list(
        self, servers: str, expected: list[str]
    ) -> None:
        assert KafkaSettings(bootstrap_servers=servers).bootstrap_list == expected


class TestPseudonymKey:
    # mypy sees pseudonym_key as a required argument; these tests pass it through the environment.
    def test_the_pseudonym_key_is_required(self) -> None:
        with pytest.raises(ValidationError) as raised:
            PrivacySettings()  # type: ignore[call-arg]
        assert raised.value.errors()[0]["type"] == "missing"
        assert raised.value.errors()[0]["loc"] == ("pseudonym_key",)

    def test_a_32_byte_key_is_read_from_the_environment(self, setenv: SetEnv) -> None:
        setenv(BEELDPORTAAL_PSEUDONYM_KEY=KEY_32)
        assert PrivacySettings().pseudonym_key.get_secret_value() == KEY_32  # type: ignore[call-arg]

    @pytest.mark.parametrize("key", ["", "x", KEY_32[:-1]])
    def test_a_key_shorter_than_32_bytes_is_refused(self, setenv: SetEnv, key: str) -> None:
        setenv(BEELDPORTAAL_PSEUDONYM_KEY=key)
        with pytest.raises(ValidationError, match="at least 32 bytes"):
            PrivacySettings()  # type: ignore[call-arg]

    def test_the_length_is_counted_in_utf8_bytes_not_characters(self) -> None:
        assert PrivacySettings(pseudonym_key=SecretStr("é" * 16)).pseudonym_key  # 32 bytes
        with pytest.raises(ValidationError, match="at least 32 bytes"):
            PrivacySettings(pseudonym_key=SecretStr("é" * 15 + "x"))  # 16 chars, 31 bytes

    def test_a_refused_key_is_not_echoed_in_the_error(self, setenv: SetEnv) -> None:
        setenv(BEELDPORTAAL_PSEUDONYM_KEY="a-real-but-too-short-secret")
        with pytest.raises(ValidationError) as raised:
            PrivacySettings()  # type: ignore[call-arg]
        assert "a-real-but-too-short-secret" not in str(raised.value)


class TestSecretsStayHidden:
    def test_the_pseudonym_key_is_masked_in_repr_str_and_dumps(self, setenv: SetEnv) -> None:
        setenv(BEELDPORTAAL_PSEUDONYM_KEY=KEY_32)
        settings = PrivacySettings()  # type: ignore[call-arg]
        for shown in (
            repr(settings),
            str(settings),
            settings.model_dump_json(),
            str(settings.model_dump()),
        ):
            assert KEY_32 not in shown

    def test_the_s3_secret_key_is_masked_also_inside_service_settings(self, setenv: SetEnv) -> None:
        setenv(BEELDPORTAAL_S3_SECRET_KEY="s3-very-secret")
        settings = ServiceSettings()
        for shown in (repr(settings), str(settings), settings.model_dump_json(), repr(settings.s3)):
            assert "s3-very-secret" not in shown
        assert settings.s3.secret_key.get_secret_value() == "s3-very-secret"

    def test_a_password_in_the_postgres_dsn_is_masked(self, setenv: SetEnv) -> None:
        setenv(BEELDPORTAAL_POSTGRES_DSN="postgresql://timeline:pg-very-secret@db:5432/timeline")
        assert "pg-very-secret" not in repr(ServiceSettings())
