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
    book.report(holds("c", seq=1, origin="p2"))  # after forget the restarted process's first report counts
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


def test_a_switch_to_a_reported_composition_that_took_a_compose_is_learned_as_one():
    """Reported prepared, but the switch took a full compose (the entry was gone by the time the
    call reached the model): a compose, not a swap, however the report read."""
    book = WorkerBook("w0", None)
    learn(book, "a")
    learn(book, "b")
    book.report(holds("a", "b", seq=1))
    learn(book, "a", compose_s=3.0)  # at least half a compose: one
    assert "swap_s" not in book.measured and book.compose_s == pytest.approx(0.7 * 4.0 + 0.3 * 3.0)


def test_a_late_report_of_a_lost_process_is_dropped():
    """The actor died with two calls out: the lost call comes back first (``forget``), the other
    one later with the dead process's report. The restarted actor is empty: that report is no
    truth, from a process that had reported before (its origin) or not (sent before the loss)."""
    book = WorkerBook("w0", None)
    learn(book, "a")
    book.report(holds("a", seq=1, adapters=("s3://b/a.safetensors",)))
    book.forget()
    book.report(holds("a", seq=2, adapters=("s3://b/a.safetensors",)))  # p0's other call, read after its death
    assert book.prepared == frozenset() and book.adapters == set()
    book.report(holds(seq=1, origin="p1"))
    learn(book, "b")
    book.report(holds("b", seq=2, origin="p1"))  # the new process's own reports are the truth
    assert book.prepared == {"b"}

    fresh = WorkerBook("w1", None)  # a process that died before any report of it came back
    sent = fresh.epoch
    learn(fresh, "a")
    fresh.forget()
    fresh.report(holds("a", seq=1, origin="q0"), sent)
    assert fresh.prepared == frozenset(), "a call sent before the loss cannot speak for the new process"
    fresh.report(holds("a", seq=1, origin="q1"), fresh.epoch)
    assert fresh.prepared == {"a"}


def test_a_composition_out_of_the_report_and_back_is_credited_again():
    """An auto-mode worker flips to merge (its report: nothing prepared in that mode) and back:
    the book still knows which routing keys the content keys it reports again stand for."""
    book = WorkerBook("w0", None)
    learn(book, "a")
    learn(book, "b")
    book.report(holds("a", "b", seq=1))
    book.report(holds(seq=2))  # merge mode now: no swaps
    assert book.prepared == frozenset()
    book.report(holds("a", "b", seq=3))  # low-rank again: the same cache entries swap once more
    assert book.prepared == {"a", "b"}


def test_the_routing_memory_is_bounded_and_keeps_what_is_reported(monkeypatch):
    import farm.books as books

    monkeypatch.setattr(books, "ROUTING_MEMORY", 3)
    monkeypatch.setattr(books, "ROUTINGS_PER_KEY", 2)
    book = WorkerBook("w0", None)
    learn(book, "a")
    book.report(holds("a", seq=1))
    for key in ("b", "c", "d", "e"):
        learn(book, key)
    assert len(book._routing_of) == 3 and "content-a" in book._routing_of, "the reported key stays"
    book.report(holds("a", "e", seq=2))
    assert book.prepared == {"a", "e"}
    for other in ("e1", "e2", "e3"):  # the same bytes under more URIs than a key keeps
        book.learn(row("e"), routing_key=other)
    assert book.prepared == {"a", "e2", "e3"}, "the newest routing keys of a content key"
