"""validate_key: one regular expression decides the common case; it must agree with the rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from shared.events.common import ObjectKey
from shared.storage.port import MAX_KEY_LENGTH, InvalidObjectKey, validate_key


def follows_the_rules(key: str) -> bool:
    """The rules as the port documents them, written out the slow way."""
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/-")
    return (
        0 < len(key) <= MAX_KEY_LENGTH
        and set(key) <= allowed
        and not key.startswith("/")
        and all(segment not in ("", ".", "..") for segment in key.split("/"))
    )


def accepted(key: str) -> bool:
    try:
        return validate_key(key) == key
    except InvalidObjectKey:
        return False


# Few characters, many of them separators and dots: the edge cases come up often.
keys = st.text(alphabet="a9./-_Zé \x00", max_size=12)


@given(keys)
def test_the_fast_path_accepts_exactly_what_the_rules_allow(key: str) -> None:
    assert accepted(key) == follows_the_rules(key)


@pytest.mark.parametrize(
    "key",
    ["a/./b", "a/../b", "./a", "a/.", "..", "a//b", "/a", "a/", "", "a b", "a\x00", "x" * 1025],
)
def test_keys_a_filesystem_or_proxy_could_rewrite_are_refused(key: str) -> None:
    assert not accepted(key)


@pytest.mark.parametrize("key", ["a/.b/..c/b.", "...", "a/.../b", "x" * 1024, "0"])
def test_dots_inside_a_segment_are_fine(key: str) -> None:
    assert accepted(key)


class _Holder(BaseModel):
    key: ObjectKey


def accepted_in_an_event(key: str) -> bool:
    try:
        return _Holder(key=key).key == key
    except ValidationError:
        return False


# The event field's pattern runs in pydantic-core's (Rust) regex engine, where "$" and
# character classes could differ from Python's re: newlines and non-ASCII are in the alphabet.
@given(st.text(alphabet="a9./-_Zé \x00\n", max_size=12))
def test_an_event_field_accepts_exactly_the_keys_the_store_accepts(key: str) -> None:
    assert accepted_in_an_event(key) == accepted(key) == follows_the_rules(key)


@pytest.mark.parametrize("key", ["a\n", "a/\n", "..", "a/..", ".", "x" * 1025, "...", ".a/..b"])
def test_edge_keys_read_the_same_in_an_event_and_in_the_store(key: str) -> None:
    assert accepted_in_an_event(key) == accepted(key)
