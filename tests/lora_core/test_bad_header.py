"""Every malformed safetensors header fails with CorruptFileError naming the file (and the tensor
key where there is one), the model untouched, in bounded memory measured from the process; and
no error echoes megabytes of a file's key names."""
from __future__ import annotations

import json

import pytest
import torch

import lora_core
from lora_core import errors as E
from lora_core.safetensors_io import MAX_HEADER_BYTES, MAX_HEADER_ITEMS, MAX_TENSORS, read_header
from testsupport import lora as T

from ..jobs.test_limits import run_measured
from .test_bad_input import check_untouched

NAMES = ("attn.to_q", "attn.to_k", "img_mlp")


@pytest.fixture
def good(qwen, tmp_path):
    layers = T.random_layers(T.linear_shapes(qwen, NAMES), rank=4, seed=1)
    return T.write_safetensors(tmp_path / "good.safetensors", T.peft_state_dict(layers))


def split(path) -> tuple[dict, bytes]:
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return str(path)


def a_keys(header: dict) -> list[str]:
    """The down (A) keys, whose tensors of to_q and to_k have the same shape."""
    return sorted(k for k in header if k.endswith("lora_A.weight") and ".attn.to_" in k)


def offsets(v):  # each edit breaks the first A key's entry one way
    return lambda e: e.update(data_offsets=v(e["data_offsets"]))


EDITS = {
    "offsets as strings": (offsets(lambda o: [str(x) for x in o]), "malformed tensor entry"),
    "offsets as floats": (offsets(lambda o: [float(x) for x in o]), "malformed tensor entry"),
    "offsets as booleans": (offsets(lambda o: [False, o[1]]), "malformed tensor entry"),
    "three offsets": (offsets(lambda o: o + [o[1]]), "malformed tensor entry"),
    "offsets a mapping": (offsets(lambda o: {"start": o[0]}), "malformed tensor entry"),
    "offsets past the data": (offsets(lambda o: [o[0], o[1] + 10**6]), "outside the file"),
    "negative offsets": (offsets(lambda o: [-4, o[1]]), "outside the file"),
    "dtype a list": (lambda e: e.update(dtype=["F32"]), "malformed tensor entry"),
    "unknown dtype": (lambda e: e.update(dtype="F128"), "malformed tensor entry"),
    "shape a string": (lambda e: e.update(shape="4x32"), "malformed tensor entry"),
    "negative shape": (lambda e: e.update(shape=[-4, -32]), "malformed tensor entry"),
    "shape of 100 dims": (lambda e: e.update(shape=[1] * 100), "malformed tensor entry"),
    "shape not matching the offsets": (lambda e: e.update(shape=[e["shape"][0] * 2, e["shape"][1]]), "needs"),
    "no dtype": (lambda e: e.pop("dtype"), "malformed tensor entry"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_malformed_tensor_entry_names_file_and_key_and_leaves_the_model_untouched(qwen, good, tmp_path, case):
    edit, match = EDITS[case]
    header, data = split(good)
    key = a_keys(header)[0]
    edit(header[key])
    e = check_untouched(qwen, write(tmp_path / "bad.safetensors", header, data), E.CorruptFileError, match)
    assert e.key == key and "bad.safetensors" in str(e)


def test_overlapping_tensors_and_bad_entries_of_other_kinds(qwen, good, tmp_path):
    header, data = split(good)
    first, second = a_keys(header)[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]  # same shape, same bytes
    e = check_untouched(qwen, write(tmp_path / "o.safetensors", header, data), E.CorruptFileError, "overlaps")
    assert e.key == second and repr(first) in str(e) and "o.safetensors" in str(e)
    header, data = split(good)
    cases = {
        "entry.safetensors": ({**header, a_keys(header)[0]: 5}, "malformed tensor entry"),
        "meta.safetensors": ({**header, "__metadata__": {"a": {"b": 1}}}, "__metadata__"),
        "list.safetensors": (b"[" + json.dumps(header).encode() + b"]", "not a JSON object"),
        "bigint.safetensors": (json.dumps(header).replace("]", ", " + "9" * 5000 + "]", 1).encode(), "not valid JSON"),
        "deep.safetensors": (b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
    }
    for name, (bad, match) in cases.items():
        e = check_untouched(qwen, write(tmp_path / name, bad, data), E.CorruptFileError, match)
        assert name in str(e)
    raw = json.dumps(header).encode()
    lengths = {"beyond.safetensors": len(raw) + len(data) + 1, "huge.safetensors": MAX_HEADER_BYTES + 1}
    for name, length in lengths.items():
        e = check_untouched(qwen, write(tmp_path / name, raw, data, length=length), E.CorruptFileError, "header length")
        assert name in str(e)


def entries(n: int) -> bytes:
    return b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i for i in range(n)) + b"}"


def refused(path: str) -> int:
    """3 (printing the error) when ``read_header`` refuses ``path`` with CorruptFileError, else 0."""
    try:
        read_header(path)
    except E.CorruptFileError as e:
        print(type(e).__name__, e)
        return 3
    return 0


def test_a_header_of_millions_of_entries_fails_in_bounded_memory_and_time(tmp_path):
    path = write(tmp_path / "many.safetensors", entries(1_500_000))  # 80 MB: ~1 GB of Python objects if parsed
    rc, out, seconds, peak, base = run_measured("from tests.lora_core.test_bad_header import refused",
                                                f"rc = refused({path!r})")
    assert rc == 3, out  # main before: parsed all 1.5 million entries, then checked each
    assert "CorruptFileError safetensors header holds about" in out and f"(limit {MAX_HEADER_ITEMS}" in out, out
    assert "many.safetensors" in out and seconds < 10 and peak - base < 200, (seconds, peak, base)
    text = write(tmp_path / "text.safetensors", b'{"__metadata__": {"a": "' + b"x" * (MAX_HEADER_BYTES - 100) + b'"}}')
    rc, out, seconds, peak, base = run_measured("from tests.lora_core.test_bad_header import refused",
                                                f"rc = refused({text!r})")
    assert rc == 0 and peak - base < 250, (out, peak, base)  # the largest header allowed: twice its size at most


def test_more_tensors_than_the_limit_is_refused_after_a_bounded_parse(tmp_path):
    path = write(tmp_path / "wide.safetensors", entries(MAX_TENSORS + 1))
    with pytest.raises(E.CorruptFileError, match=f"declares {MAX_TENSORS + 1} tensors") as e:
        read_header(path)
    assert "wide.safetensors" in str(e.value)
    assert len(read_header(write(tmp_path / "ok.safetensors", entries(1000)))) == 1000


def test_megabyte_key_names_are_echoed_short(qwen, good, tmp_path):
    """UnknownKeysError lists the keys, CorruptFileError names one: each cut, the message bounded,
    the full names kept on the error for code that needs them."""
    sd = {f"{i}{'x' * (1 << 20)}": torch.zeros(1) for i in range(30)}
    e = check_untouched(qwen, T.write_safetensors(tmp_path / "keys.safetensors", sd), E.UnknownKeysError)
    assert len(str(e)) < 6000 and "keys.safetensors" in str(e) and "(30 in all)" in str(e)  # main before: 20 MB
    assert sorted(e.keys) == sorted(sd)
    header, data = split(good)
    long = "y" * (1 << 20)
    header[long] = {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}
    e = check_untouched(qwen, write(tmp_path / "long.safetensors", header, data), E.CorruptFileError)
    assert len(str(e)) < 1000 and e.key == long and "long.safetensors" in str(e)
