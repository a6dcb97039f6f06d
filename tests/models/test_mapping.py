"""The HF <-> Megatron transforms on hand-made tensors, and the checkpoint reader's errors."""

import json

import pytest
import torch

from mcore_r1.models.dense import ModelLayout, check_pipeline_split
from mcore_r1.models.hf_checkpoint import CheckpointError, HFCheckpointReader, write_index, write_shards
from mcore_r1.models.mapping import (
    Rule, copy_transform, gate_up_transform, padded_vocab_size, qkv_transform, vocab_transform,
)


def test_qkv_groups_each_query_group_with_its_key_and_value():
    # 4 query heads, 2 groups, head_dim 1, hidden 1: rows are labelled by their head
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # heads 0,1 -> group 0; 2,3 -> group 1
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    t = qkv_transform(num_heads=4, num_groups=2, head_dim=1)
    fused = t.to_mcore([q, k, v])
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(t.to_hf(fused), (q, k, v)))
    # TP=2 takes whole groups: rank 1 holds group 1 only
    rule = Rule("x", ("q", "k", "v"), t, tp_dim=0)
    assert rule.split(fused, 1, 2).flatten().tolist() == [12, 13, 21, 31]


def test_qkv_bias_roundtrip():
    t = qkv_transform(num_heads=4, num_groups=2, head_dim=3)
    q, k, v = torch.arange(12.0), torch.arange(100.0, 106.0), torch.arange(200.0, 206.0)
    assert all(torch.equal(a, b) for a, b in zip(t.to_hf(t.to_mcore([q, k, v])), (q, k, v)))


def test_gate_up_tp_split_keeps_gate_and_up_halves():
    gate, up = torch.arange(4.0).reshape(4, 1), torch.arange(10.0, 14.0).reshape(4, 1)
    rule = Rule("fc1", ("g", "u"), gate_up_transform(), tp_dim=0)
    full = rule.transform.to_mcore([gate, up])
    shards = [rule.split(full, r, 2) for r in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 10, 11]
    assert shards[1].flatten().tolist() == [2, 3, 12, 13]
    assert torch.equal(rule.merge(shards), full)
    assert torch.equal(written_by_each_rank(rule, shards, full.shape), full)


def written_by_each_rank(rule, shards, shape):
    out = torch.full(shape, float("nan"))
    for rank, shard in enumerate(shards):
        rule.write_shard(out, shard, rank, len(shards))
    return out


def test_vocab_padding_is_added_and_removed():
    assert padded_vocab_size(2001, 2) == 2002 and padded_vocab_size(2048, 4) == 2048
    t = vocab_transform(5, padded_vocab_size(5, 2))
    emb = torch.arange(10.0).reshape(5, 2)
    padded = t.to_mcore([emb])
    assert padded.shape == (6, 2) and padded[5].abs().sum() == 0
    assert torch.equal(t.to_hf(padded)[0], emb)


def test_row_parallel_split_and_merge():
    rule = Rule("proj", ("o",), copy_transform(), tp_dim=1)
    full = torch.arange(12.0).reshape(3, 4)
    shards = [rule.split(full, r, 2) for r in range(2)]
    assert shards[0].tolist() == [[0, 1], [4, 5], [8, 9]]
    assert torch.equal(rule.merge(shards), full)
    assert torch.equal(written_by_each_rank(rule, shards, full.shape), full)


def test_pipeline_split_rules():
    check_pipeline_split(4, ModelLayout(pp=2))
    check_pipeline_split(4, ModelLayout(pp=2, first_stage_layers=1))  # last stage takes 3
    check_pipeline_split(5, ModelLayout(pp=3, first_stage_layers=1, last_stage_layers=2))
    with pytest.raises(ValueError, match=r"cannot split 4 layers over PP=3: first stage None, "
                                         r"last stage None, leaving 4 layers for 3 other stage"):
        check_pipeline_split(4, ModelLayout(pp=3))
    with pytest.raises(ValueError, match="cannot split 4 layers over PP=2"):
        check_pipeline_split(4, ModelLayout(pp=2, first_stage_layers=3, last_stage_layers=3))


def test_sharded_write_and_read(tmp_path):
    tensors = [(f"w{i}", torch.full((256,), float(i))) for i in range(5)]
    shards = write_shards(iter(tensors), tmp_path, max_shard_bytes=2048)
    write_index(tmp_path, shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 1 KiB tensors, 2 KiB shards
    reader = HFCheckpointReader(tmp_path)
    assert all(torch.equal(reader.get(n), t) for n, t in tensors)
    with pytest.raises(CheckpointError, match="tensor 'nope' is not in the checkpoint"):
        reader.get("nope")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fill_equals_split_of_the_full_tensor(tp):
    """`Rule.fill` copies straight from the HF tensors; the reference is the full Megatron
    tensor built by `to_mcore` and cut by `split`."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    heads, groups, head_dim, hidden = 8, 4, 3, 5
    cases = [
        (Rule("qkv.w", ("q", "k", "v"), qkv_transform(heads, groups, head_dim), tp_dim=0),
         [rand(heads * head_dim, hidden), rand(groups * head_dim, hidden),
          rand(groups * head_dim, hidden)]),
        (Rule("qkv.b", ("q", "k", "v"), qkv_transform(heads, groups, head_dim), tp_dim=0),
         [rand(heads * head_dim), rand(groups * head_dim), rand(groups * head_dim)]),
        (Rule("fc1", ("g", "u"), gate_up_transform(), tp_dim=0), [rand(8, hidden), rand(8, hidden)]),
        (Rule("col", ("w",), copy_transform(), tp_dim=0), [rand(8, hidden)]),
        (Rule("row", ("w",), copy_transform(), tp_dim=1), [rand(hidden, 8)]),
        (Rule("norm", ("w",), copy_transform()), [rand(hidden)]),
        # 11 rows padded to a multiple of TP: at TP=4 the last shard holds 2 rows and padding
        (Rule("emb", ("e",), vocab_transform(11, padded_vocab_size(11, tp)), tp_dim=0),
         [rand(11, hidden)]),
        # 9 rows: at TP=4 (12 padded, 3 per rank) the last shard holds padding only
        (Rule("emb9", ("e",), vocab_transform(9, padded_vocab_size(9, tp)), tp_dim=0),
         [rand(9, hidden)]),
    ]
    for rule, sources in cases:
        full = rule.transform.to_mcore(sources)
        for rank in range(tp):
            expected = rule.split(full, rank, tp)
            target = torch.full_like(expected, float("nan"))
            rule.fill(target, sources, rank, tp)
            assert torch.equal(target, expected), (rule.mcore, rank)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                   torch.int8, torch.bool])
def test_mapped_reader_matches_safetensors(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"a": (torch.randn(3, 5) * 4).to(dtype), "b": torch.ones(7).to(dtype),
               "empty": torch.zeros(0, 4).to(dtype), "scalar": torch.tensor(1).to(dtype)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = HFCheckpointReader(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for name in tensors:
            got, want = reader.get(name), f.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want), name


def test_truncated_safetensors_names_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(4), "b": torch.ones(1024)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    reader = HFCheckpointReader(tmp_path)
    assert torch.equal(reader.get("a"), torch.ones(4))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'b' .* does not fit"):
        reader.get("b")
    (tmp_path / "model.safetensors").write_bytes(b"\x10" * 8)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        HFCheckpointReader(tmp_path)


def test_missing_shard_is_named(tmp_path):
    shards = write_shards(iter([("a", torch.ones(2)), ("b", torch.ones(2))]), tmp_path, max_shard_bytes=8)
    write_index(tmp_path, shards)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        HFCheckpointReader(tmp_path)


def test_unsupported_architecture_lists_supported():
    from mcore_r1.models.builder import family_of
    from mcore_r1.models.registry import UnknownArchitectureError

    with pytest.raises(UnknownArchitectureError) as err:
        family_of({"architectures": ["MixtralForCausalLM"]}, source="ckpt/config.json")
    message = str(err.value)
    assert "ckpt/config.json: unknown model architecture 'MixtralForCausalLM'" in message
    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM",
                 "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        assert arch in message
