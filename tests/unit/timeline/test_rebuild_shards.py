"""How the rebuild shares the partitions among its loading processes (pure logic)."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition

from services.timeline.entrypoints import rebuild

TOPICS = ("study-received", "consent-checked", "consent-revoked", "delivered")


def shards(filled: dict[TopicPartition, int], processes: int) -> list[rebuild._Shard]:
    begin = {tp: 0 for tp in filled}
    return rebuild._shards(["k:9092"], "dbname=x", begin, filled, processes, 100, "revoked")


def everything(partitions: int, events: int = 5) -> dict[TopicPartition, int]:
    return {TopicPartition(t, p): events for t in TOPICS for p in range(partitions)}


def test_a_partition_number_goes_to_one_loader_with_every_topic() -> None:
    loaders = shards(everything(12), processes=3)

    assert [(s.index, s.count) for s in loaders] == [(0, 3), (1, 3), (2, 3)]
    numbers = [{tp.partition for tp in s.begin} for s in loaders]
    assert [len(n) for n in numbers] == [4, 4, 4]
    assert set().union(*numbers) == set(range(12))
    for shard in loaders:
        for number in {tp.partition for tp in shard.begin}:
            # A study's announcement, decisions and deliveries share its partition number.
            assert {tp.topic for tp in shard.begin if tp.partition == number} == set(TOPICS)


def test_only_partitions_holding_events_are_read_and_no_loader_idles() -> None:
    filled = everything(12, events=0)
    filled[TopicPartition("delivered", 7)] = 3
    filled[TopicPartition("study-received", 2)] = 1

    loaders = shards(filled, processes=8)

    assert len(loaders) == 2
    assert sorted(tp for s in loaders for tp in s.begin) == sorted(
        [TopicPartition("delivered", 7), TopicPartition("study-received", 2)]
    )
    assert all(s.end[tp] > s.begin[tp] for s in loaders for tp in s.begin)


def test_empty_topics_need_no_loader() -> None:
    assert shards(everything(12, events=0), processes=2) == []
    assert len(shards(everything(3), processes=0)) == 1


def test_the_command_exits_1_naming_why_when_the_rebuild_is_refused_or_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.timeline import main
    from services.timeline.config import TimelineSettings
    from shared import migrations
    from shared.errors import TransientError

    monkeypatch.setattr(migrations, "migrate", lambda conninfo: None)
    for error, said in (
        (rebuild.RebuildRefused("another timeline rebuild is running"), "rebuild refused"),
        (TransientError("the live timeline tables stayed locked"), "rebuild failed"),
    ):

        async def fails(settings: object, error: Exception = error) -> None:
            raise error

        monkeypatch.setattr(rebuild, "rebuild", fails)
        assert main.rebuild(TimelineSettings()) == 1
        out = capsys.readouterr()
        assert said in out.out + out.err
        assert str(error) in out.out + out.err


def described(topic: str, error_code: int = 0, partitions: int = 2) -> dict[str, object]:
    """One topic of the brokers' metadata answer, as aiokafka's admin client gives it."""
    return {
        "error_code": error_code,
        "topic": topic,
        "is_internal": False,
        "partitions": [{"error_code": 0, "partition": p} for p in range(partitions)],
    }


def test_every_partition_of_every_topic_is_read() -> None:
    answer = [described(t) for t in reversed(TOPICS)]
    partitions = rebuild._partitions(answer, list(TOPICS))
    assert partitions == [TopicPartition(t, p) for t in TOPICS for p in (0, 1)]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ([described(t) for t in TOPICS[:3]], "not in the brokers' answer"),
        (
            [*(described(t) for t in TOPICS[:3]), described(TOPICS[3], error_code=29)],
            r"TopicAuthorizationFailedError, error code 29",
        ),
        (
            [*(described(t) for t in TOPICS[:3]), described(TOPICS[3], partitions=0)],
            "no partitions",
        ),
    ],
)
def test_a_topic_the_brokers_could_not_describe_refuses_the_rebuild(
    answer: list[dict[str, object]], reason: str
) -> None:
    with pytest.raises(
        rebuild.RebuildRefused, match=f"topic delivered could not be described .{reason}"
    ):
        rebuild._partitions(answer, list(TOPICS))
