"""Tensors stored as JSON (`storage.tensors`): every stored dtype comes back
bit for bit through JSON text, and an entry that `encode_tensor` did not
write is a TensorCodecError (a ValueError), never a wrong tensor or an
unpickled object."""
from __future__ import annotations

import base64
import json
import math

import pytest
import torch

from dowsing.storage.tensors import DTYPES, TensorCodecError, decode_tensor, encode_tensor


def _through_json(entry: dict) -> dict:
    return json.loads(json.dumps(entry, allow_nan=False))


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_stored_dtype_round_trips_exactly(name):
    dtype = DTYPES[name]
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        tensor = torch.randn((3, 5, 2), generator=generator, dtype=torch.float64).to(dtype)
        tensor[0, 0, 0] = float("nan")  # raw bytes: NaN and inf survive although JSON has neither
        tensor[0, 0, 1] = float("-inf")
        tensor[1, 2, 0] = -0.0
    else:
        tensor = torch.randint(-2 ** 30, 2 ** 30, (3, 5, 2), generator=generator).to(dtype)
    back = decode_tensor(_through_json(encode_tensor(tensor)))
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("shape", [(), (0,), (4, 0), (7,)])
def test_scalars_empty_and_flat_tensors_round_trip(shape):
    tensor = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    back = decode_tensor(_through_json(encode_tensor(tensor)))
    assert back.shape == tensor.shape and torch.equal(back, tensor)


def test_a_strided_view_is_stored_as_its_values():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()[1:]
    assert torch.equal(decode_tensor(encode_tensor(tensor)), tensor)


def test_it_is_base64_of_the_raw_bytes_and_compact():
    tensor = torch.arange(1000, dtype=torch.float64)
    entry = encode_tensor(tensor)
    assert base64.b64decode(entry["data"]) == tensor.numpy().tobytes()
    assert len(json.dumps(entry)) < 1.4 * tensor.numel() * 8


def _tampered() -> list:
    good = encode_tensor(torch.ones(2, 3, dtype=torch.float32))
    return [
        ("not a dict", [1, 2]),
        ("a field missing", {k: v for k, v in good.items() if k != "shape"}),
        ("a field more", {**good, "extra": 1}),
        ("an object dtype", {**good, "dtype": "object"}),
        ("a pickle dtype name", {**good, "dtype": "O"}),
        ("a dtype not text", {**good, "dtype": 7}),
        ("a shape not a list", {**good, "shape": "2,3"}),
        ("a negative dimension", {**good, "shape": [-2, -3]}),
        ("a float dimension", {**good, "shape": [2.0, 3]}),
        ("a bool dimension", {**good, "shape": [True, 6]}),
        ("a shape the bytes do not fill", {**good, "shape": [2, 4]}),
        ("a shape past the bytes", {**good, "shape": [2 ** 40, 2 ** 40]}),
        ("another dtype's size", {**good, "dtype": "float64"}),
        ("bytes cut short", {**good, "data": good["data"][:-8]}),
        ("not base64", {**good, "data": "%%%%" + good["data"][4:]}),
        ("not ascii", {**good, "data": "é" + good["data"][1:]}),
        ("data not text", {**good, "data": list(base64.b64decode(good["data"]))}),
    ]


@pytest.mark.parametrize("what, entry", _tampered(), ids=[w for w, _ in _tampered()])
def test_a_tampered_entry_is_refused_with_a_clear_error(what, entry):
    with pytest.raises(TensorCodecError, match="stored tensor"):
        decode_tensor(entry)
    assert issubclass(TensorCodecError, ValueError)


def test_a_dtype_it_does_not_store_is_refused_on_write():
    with pytest.raises(TensorCodecError, match="not stored"):
        encode_tensor(torch.zeros(2, dtype=torch.bool))
