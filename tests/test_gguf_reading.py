"""The GGUF conversion parses the file once: transformers' own loaders,
called as the conversion calls them, build one reader per file and one
tensor-name table per architecture, give the same results as without, and
leave gguf as it was. A small GGUF file written here stands in for the
embedded model's (whose header takes seconds to parse)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from dowsing.access.gguf_reading import parsed_once


@pytest.fixture()
def small_gguf(tmp_path):
    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(5)
    writer.add_tensor("token_embd.weight", np.arange(40, dtype=np.float32).reshape(5, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def counted(monkeypatch):
    """gguf's reader and name table, counting the times each is built."""
    built = {"reader": 0, "map": 0}
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def counting_reader(*args, **kwargs):
        built["reader"] += 1
        return reader(*args, **kwargs)

    def counting_map(*args, **kwargs):
        built["map"] += 1
        return name_map(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counting_map)
    return built


def test_transformers_reads_the_file_once_with_the_same_result(small_gguf, counted):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    plain = [load_gguf_checkpoint(str(small_gguf), return_tensors=False) for _ in range(3)]
    assert counted["reader"] == 3
    with parsed_once():
        once = [load_gguf_checkpoint(str(small_gguf), return_tensors=False) for _ in range(3)]
    assert counted["reader"] == 4
    assert once == plain
    assert plain[0]["config"]["num_hidden_layers"] == 2 and plain[0]["config"]["hidden_size"] == 8


def test_one_name_table_per_architecture_and_gguf_restored(small_gguf, counted):
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with parsed_once():
        first = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3) is not first
        assert gguf.GGUFReader(small_gguf) is gguf.GGUFReader(str(small_gguf))
        # a writable map is never shared
        assert gguf.GGUFReader(small_gguf, "c") is not gguf.GGUFReader(small_gguf, "c")
    assert counted["map"] == 2
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
    assert gguf.GGUFReader(small_gguf) is not gguf.GGUFReader(small_gguf)


def test_gguf_is_restored_when_the_conversion_fails(small_gguf):
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError), parsed_once():
        raise RuntimeError("conversion failed")
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
