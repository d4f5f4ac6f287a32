"""Page tokens: round trips, and every way a token that is not ours is refused."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from flext_mesh.errors import FieldViolation, InvalidArgument
from flext_mesh.paging import MAX_PAGE_TOKEN, decode_page_token, encode_page_token

QUERY = ("ListExecutions", "order", 3)


def _refused(token: str, query: object = QUERY) -> FieldViolation:
    with pytest.raises(InvalidArgument) as refused:
        decode_page_token(token, query)  # type: ignore[arg-type]
    assert [v.field for v in refused.value.violations] == ["page_token"]
    return refused.value.violations[0]


@pytest.mark.parametrize("cursor", ["w-a", "019a3f2c8d1e5b7a9c0d1e", "0", "ünïcode-✓", "x" * 63])
def test_a_token_gives_back_its_cursor_for_the_same_query(cursor: str) -> None:
    token = encode_page_token(cursor, QUERY)
    assert token.isascii()
    assert not set(token) & set("=/+")  # URL-safe, unpadded
    assert decode_page_token(token, QUERY) == cursor


def test_no_token_is_the_first_page_and_no_cursor_is_no_next_page() -> None:
    assert decode_page_token("", QUERY) == ""
    assert encode_page_token("", QUERY) == ""


def test_a_token_stays_short() -> None:
    assert len(encode_page_token("x" * 63, QUERY)) < 120
    assert len(encode_page_token("x" * 300, QUERY)) <= MAX_PAGE_TOKEN


@pytest.mark.parametrize(
    "other",
    [
        ("ListExecutions", "order", 4),
        ("ListExecutions", "other", 3),
        ("ListExecutions", "", 3),
        ("ListWorkflows",),
        ("ListExecutions", "order", "3"),
        "ListExecutions",
    ],
)
def test_a_token_is_refused_with_another_query(other: object) -> None:
    token = encode_page_token("019a3f2c8d1e5b7a9c0d1e", QUERY)
    violation = _refused(token, other)
    assert "not a token from a previous response of this query" in violation.description


def test_a_string_query_is_the_one_item_tuple() -> None:
    token = encode_page_token("w-a", "ListWorkflows")
    assert decode_page_token(token, ("ListWorkflows",)) == "w-a"


def test_every_altered_character_is_noticed() -> None:
    token = encode_page_token("w-a", QUERY)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, char in enumerate(token):
        other = alphabet[(alphabet.index(char) + 1) % len(alphabet)]
        altered = token[:i] + other + token[i + 1 :]
        _refused(altered)


@pytest.mark.parametrize(
    "token",
    [
        "AAAA",
        base64.urlsafe_b64encode(b"w-a").decode(),  # a cursor as tokens used to be
        base64.urlsafe_b64encode(b"hello world").decode(),
        "not base64 at all!",
        "é" * 10,
        "=",
        "A",
    ],
)
def test_made_up_tokens_are_refused(token: str) -> None:
    _refused(token)


def test_an_overlong_token_is_refused_before_decoding() -> None:
    violation = _refused("A" * (MAX_PAGE_TOKEN + 1))
    assert violation.description == f"is {MAX_PAGE_TOKEN + 1} characters long; at most 512"
    assert "A" not in violation.description


def test_another_process_accepts_the_tokens_of_this_one() -> None:
    """No per-process key: replicas and restarted processes read each other's tokens."""
    code = (
        "from flext_mesh.paging import encode_page_token;"
        "print(encode_page_token('w-b', ('ListWorkflows',)))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    token = out.stdout.strip()
    assert token == encode_page_token("w-b", ("ListWorkflows",))
    assert decode_page_token(token, ("ListWorkflows",)) == "w-b"
