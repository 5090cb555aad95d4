"""WorkerBook: what the dispatcher knows of a worker. Its prepared set (the compositions whose
branches the worker keeps, a switch to one a swap) is what the worker reports with each call
(``workers.holds.Holds``, content keys), mapped to the policy's routing keys through its rows;
nothing is guessed from the rows alone."""
from __future__ import annotations

import pytest

from farm.books import WorkerBook
from jobs.results import ResultRow
from workers.holds import Holds


def row(key: str, compose_s: float = 4.0, status: str = "ok", mode: str = "lowrank") -> ResultRow:
    # the worker's row carries its content key (``lora_core``'s hash), never the policy's key
    return ResultRow("j", status, composition_key=f"content-{key}" if status == "ok" else "", lora_mode=mode,
                     compose_s=compose_s, render_s=1.0, error="" if status == "ok" else "boom")


def learn(book: WorkerBook, key: str, **kw) -> None:
    first = kw.pop("first", True)
    book.learn(row(key, **kw), routing_key=key, first=first)


def holds(*keys: str, seq: int, origin: str = "p0", adapters: tuple[str, ...] = ()) -> Holds:
    return Holds(origin, seq, tuple(f"content-{k}" for k in keys), adapters)


def test_the_report_is_the_prepared_set_and_an_eviction_shows():
    book = WorkerBook("w0", None)
    learn(book, "a")
    learn(book, "b")
    assert book.prepared == frozenset(), "rows alone credit nothing: only the worker knows its cache"
    book.report(holds("a", "b", seq=1))
    assert book.prepared == {"a", "b"}
    book.report(holds("b", seq=2))  # the worker evicted a (its cache is bounded in bytes)
    assert book.prepared == {"b"}
    book.report(None)  # a call that reached no model reports nothing: what was known stands
    assert book.prepared == {"b"}
    book.report(holds(seq=3))  # an SVDQ base change or a device move cleared it
    assert book.prepared == frozenset()


def test_a_reported_key_counts_once_a_row_names_its_routing_key():
    """Two calls in flight: the later report may name a composition whose rows are still on
    their way; it is credited when they land (and an older report changes nothing)."""
    book = WorkerBook("w0", None)
    learn(book, "b")
    book.report(holds("a", "b", seq=2))
    assert book.prepared == {"b"}, "a's routing key is not known yet"
    learn(book, "a")
    book.report(holds("a", seq=1))  # the older call's report, read second: stale
    assert book.prepared == {"a", "b"}
    book.learn(ResultRow("j", "ok", composition_key="content-a", lora_mode="lowrank", compose_s=0.0, render_s=1.0),
               routing_key="a-by-another-uri")  # the same bytes under another URI: the same cache entry
    assert book.prepared == {"a", "b", "a-by-another-uri"}


def test_a_new_process_reports_from_the_start_and_forget_empties_the_book():
    book = WorkerBook("w0", None)
    learn(book, "a")
    book.report(holds("a", seq=7, adapters=("s3://b/a.safetensors",)))
    assert book.prepared == {"a"} and book.adapters == {"s3://b/a.safetensors"}
    learn(book, "b")
    book.report(holds("b", seq=1, origin="p1"))  # the actor restarted unseen: its count starts again
    assert book.prepared == {"b"} and book.adapters == set(), "a restarted process holds only what it says"
    book.forget()
    assert book.prepared == frozenset() and book.adapters == set() and book.routing_key is None
    learn(book, "c")
    book.report(holds("c", seq=1, origin="p1"))  # after forget any report is the first
    assert book.prepared == {"c"}


def test_a_switch_to_a_reported_composition_is_learned_as_a_swap():
    book = WorkerBook("w0", None)
    learn(book, "a")
    learn(book, "b")
    book.report(holds("a", "b", seq=1))
    assert book.compose_s == 4.0 and "swap_s" not in book.measured
    learn(book, "a", compose_s=0.03)  # back to a: a swap, learned as one, not as a compose
    assert book.swap_s == pytest.approx(0.03) and book.compose_s == 4.0
    for _ in range(3):  # the rest of that group: the same seconds on every row, learned once
        learn(book, "a", compose_s=0.03, first=False)
    assert book.swap_s == pytest.approx(0.03) and book.compose_s == 4.0
    book.report(holds("a", seq=2))  # b evicted
    learn(book, "b", compose_s=5.0)  # a compose again, learned as one
    assert book.compose_s > 4.0 and book.swap_s == pytest.approx(0.03)
    learn(book, "c", status="failed")
    book.report(holds("a", "b", seq=3))
    assert book.prepared == {"a", "b"}
