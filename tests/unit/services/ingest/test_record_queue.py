"""The ingest's reader -> writer queue is bounded in bytes of text as well as in records."""

from __future__ import annotations

import queue

import pytest

from quotewatch.services.ingest.writer import ByteBoundedQueue, QueueItem


def frame(size: int, index: int = 0) -> QueueItem:
    return QueueItem("FRAME", "x" * size, "c1", index, index, 0)


def test_the_queue_is_full_by_bytes_before_it_is_full_by_records() -> None:
    items = ByteBoundedQueue(maxsize=1000, max_bytes=10_000)
    for index in range(4):
        items.put_nowait(frame(2_000, index))
    with pytest.raises(queue.Full):
        items.put_nowait(frame(2_000, 4))  # 5 x (2000 + overhead) > 10,000
    items.put_nowait(frame(100, 4))
    assert items.qsize() == 5
    assert items.get_nowait().frame_index == 0
    items.put_nowait(frame(1_500, 5))  # room again once the writer took one
    assert [items.get_nowait().frame_index for _ in range(5)] == [1, 2, 3, 4, 5]
    assert items.bytes == 0


def test_a_frame_larger_than_the_byte_limit_fits_in_an_empty_queue_only() -> None:
    items = ByteBoundedQueue(maxsize=10, max_bytes=1_000)
    items.put_nowait(frame(5_000))
    with pytest.raises(queue.Full):
        items.put_nowait(frame(1))
    items.get_nowait()
    items.put_nowait(frame(1))


def test_the_record_limit_still_holds_and_the_queue_never_blocks() -> None:
    items = ByteBoundedQueue(maxsize=2, max_bytes=10**9)
    items.put_nowait(frame(1, 0))
    items.put_nowait(frame(1, 1))
    with pytest.raises(queue.Full):
        items.put_nowait(frame(1, 2))
    with pytest.raises(NotImplementedError):
        items.put(frame(1, 2))
