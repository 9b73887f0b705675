"""Tensors as JSON values, exactly and compactly: {"dtype", "shape",
"data"} with data the base64 of the tensor's raw bytes (little-endian, as on
every platform torch runs on here).

Decoding reads the bytes with `torch.frombuffer` and nothing else: no pickle,
no object arrays. It checks the entry before it reads it (the dtype one of
DTYPES, the shape a list of non-negative integers, the data strict base64
of exactly shape x element size bytes), so a damaged or edited cache entry is
a `TensorCodecError` (a ValueError) here, which a caller treats as a
missing entry, rather than a wrong tensor further on.
"""
from __future__ import annotations

import base64
import binascii
import math

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
FIELDS = {"dtype", "shape", "data"}


class TensorCodecError(ValueError):
    """A stored tensor that is not one `encode_tensor` writes."""


def encode_tensor(tensor: torch.Tensor) -> dict:
    """{"dtype", "shape", "data"}: the tensor's exact bytes in base64."""
    if tensor.dtype not in NAMES:
        raise TensorCodecError(f"Tensors of dtype {tensor.dtype} are not stored.")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes()
    return {"dtype": NAMES[tensor.dtype], "shape": [int(n) for n in tensor.shape],
            "data": base64.b64encode(raw).decode("ascii")}


def decode_tensor(entry, device=None) -> torch.Tensor:
    """The tensor `encode_tensor` wrote (on `device`, else the CPU);
    TensorCodecError for anything else."""
    if not isinstance(entry, dict) or set(entry) != FIELDS:
        raise TensorCodecError(f"A stored tensor is a dict of exactly {sorted(FIELDS)}.")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise TensorCodecError(f"A stored tensor's dtype must be one of {sorted(DTYPES)}.")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise TensorCodecError("A stored tensor's shape must be a list of non-negative integers.")
    if not isinstance(entry["data"], str):
        raise TensorCodecError("A stored tensor's data must be base64 text.")
    try:
        raw = base64.b64decode(entry["data"].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as err:
        raise TensorCodecError("A stored tensor's data is not base64.") from err
    count = math.prod(shape)
    if len(raw) != count * torch.empty((), dtype=dtype).element_size():
        raise TensorCodecError(f"A stored tensor of shape {shape} and dtype {entry['dtype']} cannot hold "
                               f"{len(raw)} bytes.")
    if count == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        # a bytearray: torch.frombuffer shares the buffer and wants it writable
        tensor = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    return tensor.to(device) if device is not None else tensor
