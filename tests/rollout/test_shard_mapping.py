"""`export_hf_shards` / `Rule.shard_to_hf`: a rank's Megatron shard converted without
communication must be exactly its contiguous block of each HF tensor (vLLM's TP layout),
checked against slicing the real HF checkpoint tensors."""

import pytest
import torch

from mcore_r1.models.builder import weight_rules
from mcore_r1.models.hf_checkpoint import HFCheckpointReader
from mcore_r1.models.mapping import vocab_transform
from mcore_r1.models.registry import read_hf_config
from mcore_r1.models.tiny import ensure_tiny_model


@pytest.mark.parametrize("name", ["qwen2", "llama3", "qwen3"])
def test_shard_blocks_are_hf_slices(tmp_path_factory, name):
    model_dir = ensure_tiny_model(name, tmp_path_factory.mktemp("tiny"))
    hf, reader, tp = read_hf_config(model_dir), HFCheckpointReader(model_dir), 2
    checked = 0
    for rule in weight_rules(hf, tp):
        if rule.tp_dim is None or "output_layer" in rule.mcore and hf.get("tie_word_embeddings"):
            continue
        names = [n.format(layer=1) for n in rule.hf]
        sources = [reader(n) for n in names]
        full = rule.transform.to_mcore(sources)
        for rank in range(tp):
            blocks = rule.shard_to_hf(rule.split(full, rank, tp), rank, tp)
            hf_dim = 0 if rule.transform.kind != "copy" else rule.tp_dim
            for n, src, block in zip(names, sources, blocks):
                expected = src.chunk(tp, dim=hf_dim)[rank]
                assert torch.equal(block, expected), (n, rank)
                checked += 1
    assert checked >= 2 * 8


def test_vocab_blocks_cut_padding_only_where_it_is():
    vocab, tp = 10, 4  # padded to 12: ranks hold 3 rows; rank 3 holds one real row
    t = vocab_transform(vocab, 12)
    full = t.to_mcore([torch.arange(vocab * 2.0).view(vocab, 2)])
    rows = [t.to_hf_shard(full.chunk(tp)[r], r, tp)[0] for r in range(tp)]
    assert [r.shape[0] for r in rows] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(rows), full[:vocab])
