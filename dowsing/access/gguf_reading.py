"""Reading a GGUF file once while transformers converts it.

For an architecture its fast reader does not cover (Llama among them),
transformers parses the file's header in full three times in one
conversion: for the config, the tokenizer and the weights, each a
`gguf.GGUFReader` that builds every metadata field in Python (5-6 s each for
the embedded model's 49,152-token vocabulary). Mapping tensor names, it also
rebuilds gguf's name table (every tensor name of every block) once for each
of the model's ~400 submodules (6-7 s). Both are pure functions of their
arguments, so within one conversion the first result serves every call.

transformers imports both names from `gguf` inside the functions that use
them, at call time; so replacing the module's attributes for the duration of
the conversion reaches every call, and restoring them afterwards leaves the
library as it was. The replacement is process-wide while it lasts: a
conversion runs in a job's worker or a command-line process, with nothing
else reading GGUF files beside it.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager

_LOCK = threading.Lock()  # two conversions in one process must not restore each other's originals


@contextmanager
def parsed_once():
    """While inside, `gguf.GGUFReader(path)` returns one reader per file
    read-only (a read-only memory map: nothing in it changes once built)
    and `gguf.get_tensor_name_map(arch, n_blocks)` one table per pair."""
    import gguf

    with _LOCK:
        original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict = {}
        maps: dict = {}

        def reader(path, mode="r"):
            if mode != "r":  # a writable map is not shared
                return original_reader(path, mode)
            key = os.path.realpath(os.fspath(path))
            if key not in readers:
                readers[key] = original_reader(path, mode)
            return readers[key]

        def name_map(arch, n_blocks):
            if (arch, n_blocks) not in maps:
                maps[(arch, n_blocks)] = original_map(arch, n_blocks)
            return maps[(arch, n_blocks)]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map
