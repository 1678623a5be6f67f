"""Client-side stop strings: the final cut and the streaming hold-back agree."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ensemble_async.stops import StopHoldback, cut_at_stop, first_stop, held_back


def test_cut_at_first_of_several() -> None:
    assert cut_at_stop("a\n\nb###c", ["###", "\n\n"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    assert cut_at_stop("abc", []) == ("abc", False)


def test_first_stop_and_held_back() -> None:
    assert first_stop("xxENDyy", ["END"]) == 2
    assert first_stop("xx", ["END"]) is None
    assert held_back("abcEN", ["END"]) == 2
    assert held_back("abc", ["END"]) == 0


@given(
    pieces=st.lists(st.text(alphabet="ab\n#", max_size=5), max_size=12),
    stops=st.lists(st.text(alphabet="ab\n#", min_size=1, max_size=3), max_size=3),
)
def test_stream_equals_final_cut(pieces: list[str], stops: list[str]) -> None:
    hold = StopHoldback(stops)
    emitted = "".join(hold.feed(p) for p in pieces)
    final, _ = cut_at_stop("".join(pieces), stops)
    emitted += hold.finish(final)
    assert emitted == final
