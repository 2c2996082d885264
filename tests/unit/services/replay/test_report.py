"""The report's join of feature rows to label rows on (symbol, t)."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from quotewatch.services.replay.report import join_rows

_rows = st.lists(st.tuples(st.sampled_from(["BTC-USD", "ETH-USD", "SOL-USD"]), st.integers(0, 12)), max_size=40)


def _dict_join(left: list[tuple[str, int]], right: list[tuple[str, int]]) -> list[int]:
    lookup = {key: i for i, key in enumerate(right)}  # later rows win, as the report always did
    return [lookup.get(key, -1) for key in left]


def _columns(rows: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    symbols = np.array([s for s, _ in rows], dtype=np.str_)
    times = np.array([t * 100_000_000 for _, t in rows], dtype=np.int64)
    return symbols, times


@given(left=_rows, right=_rows)
def test_join_rows_equals_a_dict_lookup(left: list[tuple[str, int]], right: list[tuple[str, int]]) -> None:
    # Row indices do not depend on the time unit, so the dict joins the unscaled rows.
    assert join_rows(*_columns(left), *_columns(right)).tolist() == _dict_join(left, right)


def test_join_rows_matches_symbol_and_time_together() -> None:
    left = [("BTC-USD", 1), ("ETH-USD", 1), ("BTC-USD", 2), ("SOL-USD", 1)]
    right = [("ETH-USD", 1), ("BTC-USD", 2), ("BTC-USD", 1), ("BTC-USD", 2)]
    assert join_rows(*_columns(left), *_columns(right)).tolist() == [2, 0, 3, -1]
