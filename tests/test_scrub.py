"""ensemble_async.scrub: every leak of a key, whole or in part, plain or encoded."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble_async.errors import AuthenticationError
from ensemble_async.scrub import (
    MASK,
    Scrubber,
    ScrubHoldback,
    is_secret_field,
    scrub_exception,
    scrubbed_errors,
)

KEY = "sk-live/MARKERAAA+Zz9\u00e9"


@pytest.mark.parametrize(
    "shown",
    [
        KEY,
        KEY[:-1],  # echoed without its last character
        KEY[3:11],  # any 8 characters of it
        json.dumps(KEY)[1:-1],  # \u00e9
        json.dumps(KEY)[1:-1].replace("/", "\\/"),
        json.dumps(KEY)[1:-1].upper().replace("\\U", "\\u").replace("SK-LIVE", "sk-live"),
        json.dumps(KEY, ensure_ascii=False)[1:-1].replace("/", "\\/"),
        quote(KEY, safe=""),
        quote(KEY, safe="").lower().replace("sk-live", "sk-live"),
        quote_plus(KEY),
        quote(KEY),
    ],
)
def test_every_form_is_masked(shown: str) -> None:
    scrubber = Scrubber(KEY)
    text = f"error: token {shown} refused"
    assert scrubber.mentions(text)
    clean = scrubber.scrub(text)
    assert clean.startswith("error: token ") and clean.endswith(" refused") and MASK in clean
    assert KEY[:8] not in clean and "MARKER" not in clean
    assert scrubber.scrub_bytes(text.encode()).decode() == clean


def test_short_fragments_and_other_text_are_left_alone() -> None:
    scrubber = Scrubber(KEY)
    text = "sk-live is how keys start; MARKERA is 7 characters"
    assert scrubber.scrub(text) == text
    assert not scrubber.mentions(text)


def test_a_short_key_is_masked_whole() -> None:
    scrubber = Scrubber("abc12")
    assert scrubber.scrub("x abc12 y abc1") == "x *** y abc1"


def test_no_key_scrubs_nothing() -> None:
    for scrubber in (Scrubber(None), Scrubber("")):
        assert not scrubber and scrubber.scrub("anything") == "anything"
        assert scrubber.scrub_bytes(b"x") == b"x"
    assert "MARKER" not in repr(Scrubber(KEY))


def test_overlapping_leaks_become_one_mask() -> None:
    scrubber = Scrubber(KEY)
    assert scrubber.scrub(KEY + KEY[:-2]) == MASK
    assert scrubber.scrub(f"{KEY} and {KEY[5:]}") == f"{MASK} and {MASK}"


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(max_size=30),
    after=st.text(max_size=30),
    start=st.integers(0, len(KEY) - 8),
    length=st.integers(8, len(KEY)),
    cuts=st.lists(st.integers(1, 7), max_size=40),
)
def test_a_stream_scrubbed_in_pieces_is_the_scrubbed_whole(
    before: str, after: str, start: int, length: int, cuts: list[int]
) -> None:
    scrubber = Scrubber(KEY)
    whole = before + KEY[start : start + length] + after
    final = scrubber.scrub(whole)
    assert "MARKERAA" not in final and KEY[start : start + 8] not in final
    held = ScrubHoldback(scrubber)
    sent, pos = [], 0
    for cut in cuts:
        sent.append(held.feed(whole[pos : pos + cut]))
        pos += cut
    sent.append(held.feed(whole[pos:]))
    sent.append(held.finish(final))
    assert "".join(sent) == final
    for i in range(1, len(sent) + 1):  # every prefix of the stream is clean too
        assert final.startswith("".join(sent[:i]))


def test_errors_are_scrubbed_and_chains_that_quote_the_key_cut() -> None:
    scrubber = Scrubber(KEY)
    with pytest.raises(AuthenticationError) as info, scrubbed_errors(scrubber):
        try:
            raise ValueError(f"raw {KEY}")
        except ValueError as cause:
            raise AuthenticationError(f"bad token {KEY[:-1]}") from cause
    exc = info.value
    assert exc.message == "bad token ***" and str(exc).startswith("bad token ***")
    assert exc.__cause__ is None and exc.__suppress_context__
    plain = RuntimeError("nothing secret")
    scrub_exception(plain, scrubber)
    assert plain.args == ("nothing secret",)


@pytest.mark.parametrize(
    ("name", "secret"),
    [("api_key", True), ("Authorization", True), ("api_key_env", False), ("model", False)],
)
def test_secret_field_names(name: str, secret: bool) -> None:
    assert is_secret_field(name) is secret
