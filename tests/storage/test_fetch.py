"""Fault classification (retry or fail fast) and the retry loop of one transfer.

No server: the exceptions are built the way fsspec, aiohttp and s3fs raise them.
"""
from __future__ import annotations

import errno

import pytest

from storage.errors import ChecksumMismatch, FetchError, PermanentFetchError, TruncatedTransferError
from storage.fetch import classify_fetch_error, with_retries

pytestmark = pytest.mark.timeout(60)


def _client_response_error(status: int) -> Exception:
    import aiohttp

    return aiohttp.ClientResponseError(request_info=None, history=(), status=status, message="x")  # type: ignore[arg-type]


def _not_found_caused_by(cause: Exception) -> Exception:
    try:
        raise FileNotFoundError("http://h/x") from cause
    except FileNotFoundError as e:
        return e


@pytest.mark.parametrize(
    "exc, expected",
    [
        (FileNotFoundError("x"), PermanentFetchError),
        (PermissionError("x"), PermanentFetchError),
        (ValueError("bad url"), PermanentFetchError),
        (ConnectionResetError("reset"), FetchError),
        (TimeoutError(), FetchError),
        (OSError(errno.EIO, "io"), FetchError),
        (OSError(errno.ENOSPC, "disk full"), PermanentFetchError),
        ("404", PermanentFetchError),
        ("403", PermanentFetchError),
        ("500", FetchError),
        ("503", FetchError),
        ("429", FetchError),
        ("notfound<-500", FetchError),
        ("notfound<-404", PermanentFetchError),
        ("payload", TruncatedTransferError),
        (ChecksumMismatch("m"), ChecksumMismatch),
    ],
)
def test_classify_fetch_error(exc, expected):
    import aiohttp

    if isinstance(exc, str):
        if exc == "payload":
            exc = aiohttp.ClientPayloadError("cut")
        elif exc.startswith("notfound<-"):
            exc = _not_found_caused_by(_client_response_error(int(exc.split("-")[1])))
        else:
            exc = _client_response_error(int(exc))
    cls, reason = classify_fetch_error(exc)
    assert cls is expected and reason


def test_with_retries_counts_and_chains():
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    seen = []
    assert with_retries(flaky, url="s3://b/k", retries=4, backoff_s=0.001, on_retry=seen.append) == "ok"
    assert len(calls) == 3 and len(seen) == 2

    def always() -> None:
        raise ConnectionResetError("reset by peer")

    with pytest.raises(FetchError) as info:
        with_retries(always, url="s3://b/k", retries=2, backoff_s=0.001)
    assert "s3://b/k" in str(info.value) and "3 attempts" in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionResetError)
