"""Single-copy reads of torch_dist checkpoints, against torch.load and Megatron's own reader."""

import io
import pickle
import struct

import pytest
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index

from mcore_r1.models import dist_io
from tests.dist_utils import run_workers


def _archive(obj, crc: bool) -> bytes:
    was = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc)
    try:
        out = io.BytesIO()
        torch.save(obj, out)
        return out.getvalue()
    finally:
        torch.serialization.set_crc32_options(was)


def _tensors():
    base = torch.arange(24.0).reshape(4, 6)
    return {
        "float32": torch.randn(5, 7),
        "bfloat16": torch.randn(3, 9).to(torch.bfloat16),
        "int64": torch.arange(10),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": base.t(),  # whole storage, strides (1, 6)
        "offset_view": base[1:],  # storage of 24 elements, offset 6
        "bool": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("crc", [True, False])
def test_record_view_equals_torch_load(crc):
    # records at an odd offset inside a larger buffer, as in a .distcp file
    for name, tensor in _tensors().items():
        record = _archive(tensor, crc)
        buffer = bytearray(b"x" * 13 + record + b"y" * 7)
        parsed = dist_io.read_tensor_record(buffer, 13, len(record))
        view = dist_io.byte_view(buffer, 13, parsed)
        expected = torch.load(io.BytesIO(record), weights_only=True)
        assert parsed.dtype == expected.dtype, name
        assert torch.equal(view, expected.unsqueeze(-1).view(torch.uint8)), name
        # a narrowed slice, as a resharded load asks for
        if expected.dim() == 2 and expected.shape[0] > 1 and expected.shape[1] > 2:
            part = narrow_tensor_by_index(view, (1, 1), (expected.shape[0] - 1, 2))
            assert torch.equal(part, expected[1:, 1:3].unsqueeze(-1).view(torch.uint8)), name


def test_records_it_does_not_understand_are_refused():
    for obj in ([torch.ones(2)], {"a": torch.ones(2)}, torch.nn.Parameter(torch.ones(2))):
        record = _archive(obj, crc=False)
        with pytest.raises(dist_io.UnsupportedRecord):
            dist_io.read_tensor_record(record, 0, len(record))
    with pytest.raises(dist_io.UnsupportedRecord):
        dist_io.read_tensor_record(b"not a zip archive at all", 0, 24)
    # a pickle naming any other global is refused without running it
    evil = pickle.dumps(print)
    with pytest.raises(dist_io.UnsupportedRecord, match="builtins.print"):
        dist_io._TensorPickle(io.BytesIO(evil)).load()


def _local_headers_moved_to(record: bytes, offset: int) -> bytes:
    """The archive with every central-directory entry pointing its local header at `offset`."""
    out, at = bytearray(record), record.find(b"PK\x01\x02")
    while at != -1:
        struct.pack_into("<I", out, at + 42, offset)
        at = record.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def test_corrupt_records_are_refused_not_crashed_on():
    record = _archive(torch.randn(4, 4), crc=False)
    broken = (
        record[:40] + record[-200:],  # the middle cut out
        b"\0" * 64 + record[64:],  # the first local header overwritten
        _local_headers_moved_to(record, len(record) - 10),  # headers past the end: short read
    )
    for data in broken:
        with pytest.raises(dist_io.UnsupportedRecord):
            dist_io.read_tensor_record(data, 0, len(data))


FULL = {"rows": torch.arange(48.0).reshape(8, 6),
        "cols": torch.arange(100.0, 124.0).reshape(4, 6).to(torch.bfloat16)}
# saved as bf16, loaded into float32: the fast path declines it and torch's reader converts
CAST = "cast"


def _save_and_load(rank, world_size, directory):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=world_size))
    # saved split over ranks: "rows" by rows, "cols" by columns
    saved = {
        "rows": ShardedTensor.from_rank_offsets(
            "rows", FULL["rows"].chunk(world_size, 0)[rank].clone(), (0, rank, world_size)),
        "cols": ShardedTensor.from_rank_offsets(
            "cols", FULL["cols"].chunk(world_size, 1)[rank].contiguous(), (1, rank, world_size)),
        CAST: ShardedTensor.from_rank_offsets(
            CAST, FULL["cols"].chunk(world_size, 0)[rank].clone(), (0, rank, world_size)),
    }
    dist_checkpointing.save(saved, directory,
                            sharded_strategy=dist_io.save_strategy(fsync=False, checksums=False))

    def template(split_dim):
        # loaded the other way round: each rank asks for a slice that crosses the saved shards
        out = {}
        for key, full in FULL.items():
            piece = full.chunk(world_size, split_dim)[rank]
            out[key] = ShardedTensor.from_rank_offsets(
                key, torch.full_like(piece.contiguous(), -1), (split_dim, rank, world_size))
        out[CAST] = ShardedTensor.from_rank_offsets(
            CAST, torch.full(FULL["cols"].chunk(world_size, 0)[rank].shape, -1.0), (0, rank, world_size))
        return out

    strategy = dist_io.load_strategy()
    fast = dist_checkpointing.load(template(1), directory, sharded_strategy=strategy)
    reference = dist_checkpointing.load(template(1), directory)  # Megatron's own strategy
    return ({k: v.clone() for k, v in fast.items()}, {k: v.clone() for k, v in reference.items()},
            strategy.reader.copied, strategy.reader.declined)


def test_resharded_load_matches_megatron_reader(tmp_path):
    (tmp_path / "ckpt").mkdir()
    results = run_workers(_save_and_load, 2, str(tmp_path / "ckpt"))
    for rank, (fast, reference, copied, declined) in enumerate(results):
        for key, full in FULL.items():
            expected = full.chunk(2, 1)[rank]
            assert fast[key].dtype == full.dtype and torch.equal(fast[key], expected), key
            assert torch.equal(reference[key], expected), key
        assert fast[CAST].dtype == torch.float32
        assert torch.equal(fast[CAST], FULL["cols"].chunk(2, 0)[rank].float())
        assert torch.equal(reference[CAST], fast[CAST])
        # each rank's column slice overlaps both saved row shards of "rows" and one of "cols";
        # the float32 target of the bf16 record goes to torch's reader
        assert (copied, declined) == (3, 1)


def _swiglu_round_trip(rank, world_size, directory):
    """fc1 = [gate; up] saved split over TP=2 through Megatron's SwiGLU factory, loaded whole
    on each rank (a resharded load) with and without `merge_in_place`."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(world_size, tp=world_size))
    gate, up = FULL["rows"], FULL["rows"] * 2 + 1

    def factory(data, rank_, parts, replica):
        tensor = ShardedTensor.from_rank_offsets("fc1", data, (0, rank_, parts),
                                                 replica_id=replica)
        return {"fc1": apply_swiglu_sharded_factory(tensor, ())}

    shard = torch.cat([gate.chunk(world_size)[rank], up.chunk(world_size)[rank]])
    dist_checkpointing.save(factory(shard, rank, world_size, 0), directory,
                            sharded_strategy=dist_io.save_strategy(fsync=False, checksums=False))
    target = torch.full((2 * gate.shape[0], gate.shape[1]), -1.0, dtype=gate.dtype)
    loaded = dist_checkpointing.load(dist_io.merge_in_place(factory(target, 0, 1, rank)),
                                     directory, sharded_strategy=dist_io.load_strategy())
    plain = dist_checkpointing.load(factory(torch.zeros_like(target), 0, 1, rank), directory)
    return loaded["fc1"] is target, target.clone(), plain["fc1"].clone()


def test_swiglu_merge_returns_the_loaded_parameter(tmp_path):
    (tmp_path / "ckpt").mkdir()
    gate, up = FULL["rows"], FULL["rows"] * 2 + 1
    for same, in_place, plain in run_workers(_swiglu_round_trip, 2, str(tmp_path / "ckpt")):
        assert same  # no concatenated copy: the factory hands back the tensor it filled
        assert torch.equal(in_place, torch.cat([gate, up]))
        assert torch.equal(plain, in_place)  # Megatron's own load and merge agree


def test_in_place_merge_falls_back_unless_pieces_are_the_chunks():
    data = torch.arange(12.0).reshape(4, 3)
    merge = dist_io._in_place_cat(data, lambda pieces: torch.cat(pieces))
    assert merge(list(data.chunk(2))) is data
    copies = [c.clone() * 10 for c in data.chunk(2)]  # loaded somewhere else
    assert torch.equal(merge(copies), data * 10)
    assert torch.equal(merge(list(reversed(data.chunk(2)))), torch.cat([data[2:], data[:2]]))


def test_direct_writes_point_tensors_at_their_sources_or_fill_the_parameter():
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    whole, fc1, by_columns = (torch.full((4, 3), -1.0) for _ in range(3))
    whole_piece = torch.arange(12.0).reshape(4, 3)
    gate, up = torch.arange(6.0).reshape(2, 3) + 100, torch.arange(6.0).reshape(2, 3) + 200
    columns_piece = torch.arange(12.0).reshape(4, 3) + 300
    direct = dist_io.DirectWrites()
    assert direct(whole, [whole_piece]) and direct(fc1, [gate, up])
    assert direct(by_columns, [columns_piece])
    assert not direct(torch.empty(2, 3), [whole_piece[:2]])  # a view: the writer would copy it
    assert not direct(torch.empty(4, 3, dtype=torch.bfloat16), [whole_piece])
    state = {
        "whole": ShardedTensor.from_rank_offsets("whole", whole),
        "fc1": apply_swiglu_sharded_factory(ShardedTensor.from_rank_offsets("fc1", fc1), ()),
        # saved through a view that is not a run of rows: cannot be swapped
        "cols": [ShardedTensor.from_rank_offsets("cols", by_columns[:, :2].contiguous()),
                 ShardedTensor.from_rank_offsets("cols2", by_columns[:, 1:])],
    }
    direct.point_at_sources(state)
    saved = {t.key: t.data for t in nested_values(state)}
    assert saved["whole"] is whole_piece
    assert state["fc1"][0].data is gate and state["fc1"][1].data is up
    assert (direct.swapped, direct.filled) == (3, 1)
    assert torch.equal(by_columns, columns_piece)  # filled after all
    assert torch.equal(whole, torch.full((4, 3), -1.0))  # deferred and never written


def _direct_conversion_counts(rank, world_size, model_dir):
    from mcore_r1.models.builder import layer_tables, load_hf_model, weight_rules
    from mcore_r1.models.dense import ModelLayout
    from mcore_r1.models.mapping import bind_rules
    from mcore_r1.parallel import ParallelDims
    from mcore_r1.parallel.runtime import initialize_parallel

    initialize_parallel(ParallelDims(1))
    direct = dist_io.DirectWrites()
    model, hf = load_hf_model(model_dir, ModelLayout(), defer=direct)
    kinds = [b.rule.transform.kind
             for b in bind_rules(model, weight_rules(hf, 1), layer_tables(model))]
    direct.point_at_sources(model.sharded_state_dict())
    return kinds, len(direct.deferred), direct.swapped, direct.filled


def test_tp1_conversion_writes_every_unchanged_tensor_from_the_hf_file(tmp_path):
    from mcore_r1.models.tiny import ensure_tiny_model

    model_dir = ensure_tiny_model("qwen2", tmp_path)
    kinds, deferred, swapped, filled = run_workers(_direct_conversion_counts, 1, str(model_dir))[0]
    assert deferred == len(kinds) - kinds.count("qkv") > 0  # all but the interleaved qkv
    assert filled == 0 and swapped == deferred + kinds.count("gate_up")  # fc1 saves as 2
