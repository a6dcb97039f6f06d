"""Shared-memory exchange between processes of one host, against gloo's all-gather (each rank writing its own row)."""

import os

import torch

from mcore_r1.parallel import shm_gather
from tests.dist_utils import run_workers


def _gather_twice(rank, world):
    import torch.distributed as dist

    from mcore_r1.parallel.shm_gather import NodeLocalExchange

    dist.init_process_group("gloo")
    group = dist.new_group(list(range(world)))
    exchange = NodeLocalExchange.create(group, 4 * 6 * 5 * world)
    out = []
    for seed in (1, 2):  # the second gather reuses (overwrites) the buffer
        mine = torch.randn(6, 5, generator=torch.Generator().manual_seed(seed * 10 + rank))
        expected = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(expected, mine, group=group)
        def fill(buffer):  # rank r writes row r, like the refit writes its shards
            buffer[:mine.numel() * 4 * world].view(torch.float32).view(world, 6, 5)[rank].copy_(mine)

        got = exchange.exchange(fill)[:mine.numel() * 4 * world].view(torch.float32).view(world, 6, 5).clone()
        out.append(all(torch.equal(got[r], expected[r]) for r in range(world)))
    leftovers = [p.name for p in shm_gather.SHM_DIR.glob(f"mcore_r1_exchange_{os.getpid()}_*")]
    return out, leftovers


def test_all_gather_through_shared_memory_equals_gloo():
    for matches, leftovers in run_workers(_gather_twice, 2):
        assert matches == [True, True]
        assert leftovers == []  # unlinked once every rank had mapped it


def test_a_mapping_that_is_not_there_is_refused_without_creating_it(tmp_path):
    missing = tmp_path / "absent"
    assert shm_gather._map((str(missing), "token"), 64) is None
    assert not missing.exists()


def test_a_file_without_the_token_is_refused(tmp_path):
    other = tmp_path / "other"
    other.write_bytes(b"\0" * 64)
    assert shm_gather._map((str(other), "abcd"), 64) is None
