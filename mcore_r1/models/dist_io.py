"""Synchronous save and single-copy load of Megatron's `torch_dist` checkpoints.

The files are exactly what megatron.core.dist_checkpointing writes and reads (torch
distributed checkpoint: `__<rank>_0.distcp` files plus `.metadata`), so a checkpoint written
here loads with Megatron's own strategies at any TP/PP and the other way round. What differs
is the work done per byte:

- Saving runs in the calling process. Megatron's default strategy is built for asynchronous
  training checkpoints: it starts a manager process and forks writers on every save, seconds
  of fixed cost that dominate a one-off conversion.
- Loading copies each stored tensor once, from the page cache into its destination. Torch's
  reader reads every record into a buffer, `torch.load`s it into a fresh tensor and then
  copies the slice it needs: three passes over the bytes and a full-size allocation for each
  tensor. Here each `.distcp` file is memory-mapped, the record's tensor header is read, and
  the requested slice is copied from the mapping straight into the model's parameter.

Every record is a `torch.save` archive (a stored, uncompressed zip). The fast path reads only
what it understands: a little-endian archive whose pickle is exactly one tensor of a standard
dtype, rebuilt by `torch._utils._rebuild_tensor_v2`. Anything else (another pickle, a
compressed or transformed record, a newer tensor encoding) is handed to torch's own reader
unchanged, so the fast path can make a load faster but never different.
"""

from __future__ import annotations

import bisect
import collections
import io
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from typing import Optional

import torch

from mcore_r1.models.hf_checkpoint import frombuffer, map_file
from mcore_r1.models.mapping import copy_pieces


def save_strategy(fsync: bool = True, checksums: bool = True):
    """Megatron's torch_dist format, written synchronously in this process.

    `fsync=False` leaves flushing to the kernel. Training checkpoints keep it on: a run resumes
    from them unattended after a crash. The converter turns it off, like the safetensors files
    it writes on the other side (and transformers' `save_pretrained`): an interrupted
    conversion is simply run again.

    `checksums=False` skips the CRC-32 that `torch.save` computes over every record (0.16 s
    per GB here); readers accept records without one. The converter's safetensors output has
    no checksums either. Training checkpoints keep them.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    class SyncTorchDistSave(mtorch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = mtorch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            crc_was = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(checksums)
            try:
                dcp.save(mtorch.mcore_to_pyt_state_dict(state, False),
                         storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1,
                                                             sync_files=fsync),
                         planner=mtorch.MCoreSavePlanner(
                             dedup_replicated_tensors=not self.keep_only_main_replica,
                             flatten_state_dict=False))
            finally:
                torch.serialization.set_crc32_options(crc_was)

    return SyncTorchDistSave("torch_dist", 1)


def load_strategy():
    """Megatron's torch_dist load, reading through `MappedFileSystemReader`."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    class MappedTorchDistLoad(mtorch.TorchDistLoadShardedStrategy):
        # Megatron's `load` with the reader swapped; the key handling is its own helpers.
        def load(self, sharded_state_dict, checkpoint_dir):
            tensors = [t for t in nested_values(sharded_state_dict)
                       if isinstance(t, ShardedTensor)]
            flexible = [t for t in tensors if not t.allow_shape_mismatch]
            mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
            original = sharded_state_dict
            sharded_state_dict, flat_mapping, rename_mapping = (
                mtorch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict))
            pyt_state_dict = mtorch.mcore_to_pyt_state_dict(sharded_state_dict, True)
            reader = self.reader = mapped_reader_class()(checkpoint_dir)
            dcp.load(pyt_state_dict, storage_reader=reader, planner=mtorch.MCoreLoadPlanner(
                shapes_validation_sharded_tensors=flexible,
                allow_shape_mismatch_sharded_tensors=mismatch_ok))
            self.cached_global_metadata = reader.read_metadata()
            state = {k: mtorch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
            state = mtorch._replace_sharded_keys_with_state_dict_keys(
                state, flat_mapping, rename_mapping)
            mtorch._restore_dict_types(state, original)
            return state

    return MappedTorchDistLoad()


class DirectWrites:
    """Parameters whose checkpoint bytes are written straight from the mapped HF tensors.

    Converting HF -> Megatron would otherwise copy every byte twice: from the HF file into the
    model's parameters, then from the parameters into the `.distcp` file. Most Megatron
    tensors are HF tensors stored unchanged (`Rule.stored_pieces`: embeddings, norms, output
    and down projections, and the gate and up halves of `linear_fc1`), so the converter hands
    this object to `load_hf_weights(defer=...)` to skip filling those, then `point_at_sources`
    makes the sharded state dict save the HF tensors themselves.

    A piece is taken only if torch's writer saves it without a copy: a contiguous tensor that
    is its whole storage (the writer clones views of larger storages first, so a TP slice of
    an HF tensor costs a copy either way and is filled as usual) of the parameter's dtype.
    """

    def __init__(self):
        self.deferred: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.swapped = self.filled = 0  # tensors now saved from HF pieces; parameters filled

    def __call__(self, parameter: torch.Tensor, pieces: list[torch.Tensor]) -> bool:
        if parameter.is_contiguous() and all(_is_whole_storage(p) and p.dtype == parameter.dtype
                                             for p in pieces):
            self.deferred.append((parameter, pieces))
            return True
        return False

    def point_at_sources(self, sharded_state_dict):
        """Apply Megatron's factories (as its save would) and point every tensor that is a
        deferred parameter's piece at the HF tensor it comes from. A deferred parameter that
        is still saved through a view this cannot swap is filled after all. The parameters
        stay unfilled otherwise: only for a model that is saved and dropped."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

        apply_factories(sharded_state_dict)
        order = sorted(range(len(self.deferred)), key=lambda i: self.deferred[i][0].data_ptr())
        starts = [self.deferred[i][0].data_ptr() for i in order]
        unswapped = set()
        for tensor in nested_values(sharded_state_dict):
            if not isinstance(tensor, ShardedTensor) or tensor.data is None:
                continue
            at = bisect.bisect_right(starts, tensor.data.data_ptr()) - 1
            if at < 0 or not _overlaps(tensor.data, self.deferred[order[at]][0]):
                continue
            piece = _piece_at(tensor.data, *self.deferred[order[at]])
            if piece is None:
                unswapped.add(order[at])
            else:
                tensor.data = piece
                self.swapped += 1
        with torch.no_grad():
            for owner in sorted(unswapped):
                copy_pieces(*self.deferred[owner])
        self.filled += len(unswapped)
        return sharded_state_dict


def _is_whole_storage(t: torch.Tensor) -> bool:
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _overlaps(view: torch.Tensor, param: torch.Tensor) -> bool:
    start = param.data_ptr()
    return start <= view.data_ptr() < start + param.numel() * param.element_size()


def _piece_at(view: torch.Tensor, param: torch.Tensor, pieces: list[torch.Tensor]):
    """The piece holding exactly the rows of `param` that `view` covers, or None."""
    if (param.dim() == 0 or view.dim() != param.dim() or view.shape[1:] != param.shape[1:]
            or view.dtype != param.dtype or not view.is_contiguous()):
        return None
    row_bytes = param[0].numel() * param.element_size()
    offset = view.data_ptr() - param.data_ptr()
    if row_bytes == 0 or offset % row_bytes:
        return None
    row = offset // row_bytes
    for piece in pieces:
        if row == 0 and piece.shape == view.shape:
            return piece
        row -= piece.shape[0]
    return None


def merge_in_place(sharded_state_dict):
    """Let Megatron's SwiGLU factories return the parameter they were loaded into.

    Megatron stores `linear_fc1` as two tensors (gate and up) so that each reshards on its
    own: a factory chunks the parameter into two views to load, then its merge `torch.cat`s
    the loaded views into a new tensor, which `load_state_dict` copies back into the
    parameter. The views were filled in place, so the parameter already holds the result:
    here the merge returns it when the loaded pieces are still exactly those views (same
    memory, shapes and strides), and falls back to Megatron's merge otherwise. This saves two
    copies of the MLP input weights, about 45% of a Qwen2.5 model's bytes. Returns the same
    dict, modified in place.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    for factory in nested_values(sharded_state_dict):
        if (isinstance(factory, ShardedTensorFactory)
                and factory.merge_fn.__qualname__.startswith("apply_swiglu_sharded_factory.")):
            factory.merge_fn = _in_place_cat(factory.data, factory.merge_fn)
    return sharded_state_dict


def _in_place_cat(data: torch.Tensor, merge_fn):
    def merge(pieces):
        if _are_chunks_of(pieces, data):
            return data
        return merge_fn(pieces)

    return merge


def _are_chunks_of(pieces, data: torch.Tensor) -> bool:
    """True when `pieces` are the views `data.chunk(len(pieces), dim=0)` itself would give."""
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, torch.Tensor)
                                                       for p in pieces):
        return False
    chunks = data.chunk(len(pieces), dim=0)
    return len(chunks) == len(pieces) and all(
        p.data_ptr() == c.data_ptr() and p.shape == c.shape and p.stride() == c.stride()
        and p.dtype == c.dtype for p, c in zip(pieces, chunks))


# ---- reading one torch.save record in place -------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class UnsupportedRecord(Exception):
    """A record the fast path does not read; torch's reader takes it instead."""


@dataclass(frozen=True)
class TensorRecord:
    """Where a stored tensor's bytes are and how the tensor views them."""

    data_offset: int  # of the storage bytes, from the start of the record
    data_bytes: int
    dtype: torch.dtype
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Storage:
    dtype: torch.dtype
    key: str
    numel: int


@dataclass(frozen=True)
class _Rebuilt:
    storage: _Storage
    storage_offset: int
    size: tuple
    stride: tuple


class _TensorPickle(pickle.Unpickler):
    """Reads `data.pkl` of a single-tensor archive without touching any storage bytes; any
    global other than the plain tensor rebuild is refused."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: _Rebuilt(storage, offset,
                                                                     tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise UnsupportedRecord(f"pickle global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and pid[1] in _STORAGE_DTYPES):
            raise UnsupportedRecord(f"persistent id {pid!r}")
        return _Storage(_STORAGE_DTYPES[pid[1]], str(pid[2]), int(pid[4]))


class _Window(io.RawIOBase):
    """A read-only file over `buffer[start:start + length]`, for zipfile."""

    def __init__(self, buffer, start: int, length: int):
        self._view, self._pos = memoryview(buffer)[start:start + length], 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos + (0, self._pos, len(self._view))[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, out) -> int:
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._view.release()
        super().close()


def _member_offset(buffer, start: int, info: zipfile.ZipInfo) -> int:
    """Offset of a stored member's bytes from the archive start, read from its local header."""
    at = start + info.header_offset
    signature, name_len, extra_len = struct.unpack("<I22xHH", bytes(memoryview(buffer)[at:at + 30]))
    if signature != 0x04034B50 or info.compress_type != zipfile.ZIP_STORED:
        raise UnsupportedRecord(f"member {info.filename} is not a stored zip entry")
    return info.header_offset + 30 + name_len + extra_len


def _member_bytes(buffer, start: int, info: zipfile.ZipInfo) -> bytes:
    # read directly: zipfile checks CRC-32s, and records saved without checksums have none
    at = start + _member_offset(buffer, start, info)
    return bytes(memoryview(buffer)[at:at + info.file_size])


def read_tensor_record(buffer, start: int, length: int) -> TensorRecord:
    """Parse the `torch.save` archive at `buffer[start:start+length]` holding one tensor.
    Anything it cannot parse, corrupt bytes included, raises `UnsupportedRecord`."""
    if sys.byteorder != "little":  # the bytes are copied as they are
        raise UnsupportedRecord("big-endian host")
    try:
        return _parse_tensor_record(buffer, start, length)
    except (struct.error, KeyError, IndexError) as err:  # truncated or inconsistent archive
        raise UnsupportedRecord(f"malformed record: {err!r}") from err


def _parse_tensor_record(buffer, start: int, length: int) -> TensorRecord:
    window = _Window(buffer, start, length)
    try:
        with zipfile.ZipFile(window) as archive:
            infos = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, ValueError) as err:
        raise UnsupportedRecord(str(err)) from err
    finally:
        window.close()
    pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise UnsupportedRecord(f"{len(pickles)} data.pkl entries")
    prefix = pickles[0][:-len("data.pkl")]
    order = infos.get(prefix + "byteorder")
    if order is not None and _member_bytes(buffer, start, order) != b"little":
        raise UnsupportedRecord("big-endian archive")
    try:
        rebuilt = _TensorPickle(io.BytesIO(_member_bytes(buffer, start, infos[pickles[0]]))).load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
        raise UnsupportedRecord(f"data.pkl: {err}") from err
    if not isinstance(rebuilt, _Rebuilt) or not isinstance(rebuilt.storage, _Storage):
        raise UnsupportedRecord(f"pickle holds a {type(rebuilt).__name__}, not a plain tensor")
    storage = rebuilt.storage
    data = infos.get(f"{prefix}data/{storage.key}")
    if data is None or data.file_size != storage.numel * storage.dtype.itemsize:
        raise UnsupportedRecord(f"storage record {storage.key} is missing or has the wrong size")
    return TensorRecord(_member_offset(buffer, start, data), data.file_size, storage.dtype,
                        rebuilt.storage_offset, rebuilt.size, rebuilt.stride)


def byte_view(buffer, start: int, record: TensorRecord) -> torch.Tensor:
    """The stored tensor as a uint8 view of `buffer` whose last dimension is its bytes, so
    copies never depend on how the record happens to be aligned in the file."""
    itemsize = record.dtype.itemsize
    size = record.size + (itemsize,)
    stride = tuple(s * itemsize for s in record.stride) + (1,)
    if record.data_bytes == 0:
        base = torch.empty(0, dtype=torch.uint8)
    else:
        base = frombuffer(buffer, start + record.data_offset, record.data_bytes)
    return base.as_strided(size, stride, record.storage_offset * itemsize)


def mapped_reader_class():
    """Megatron's metadata-caching FileSystemReader, reading tensors through `mmap`."""
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    # torch's own reader narrows with it; it leaves a byte view's extra last dimension alone
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan
    from torch.futures import Future

    class MappedFileSystemReader(CachedMetadataFileSystemReader):
        copied = declined = 0  # tensor reads by this path and handed to torch's

        def read_data(self, plan, planner):
            per_file: dict[str, list] = {}
            others = []
            for req in plan.items:
                info = self.storage_data[req.storage_index]
                if req.type == LoadItemType.BYTE_IO or info.transform_descriptors:
                    others.append(req)
                else:
                    per_file.setdefault(info.relative_path, []).append(req)
            for relative_path, reqs in per_file.items():
                others += self._copy_from_file(relative_path, reqs, planner)
            if others:
                super().read_data(LoadPlan(others), planner)
            self.declined += sum(req.type != LoadItemType.BYTE_IO for req in others)
            future: Future = Future()
            future.set_result(None)
            return future

        def _copy_from_file(self, relative_path: str, reqs, planner) -> list:
            """Copy each request's slice out of the mapped file; returns those it could not.

            The mapping is never closed explicitly: views made by `frombuffer` keep the mmap
            object alive, not its mapping, and `close()` would unmap under any view still held
            (by a traceback, say). It is unmapped when the last reference goes."""
            path = self.fs.concat_path(self.path, relative_path)
            with open(path, "rb") as f:
                buffer = map_file(f)
            records: dict[int, Optional[TensorRecord]] = {}
            declined = []
            for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                info = self.storage_data[req.storage_index]
                if info.offset not in records:
                    try:
                        records[info.offset] = read_tensor_record(buffer, info.offset, info.length)
                    except UnsupportedRecord:
                        records[info.offset] = None
                record = records[info.offset]
                # decide before resolve_tensor: a resolved request must be committed (Megatron's
                # planner keeps per-request state between the two, e.g. for FP8 targets)
                if record is None or planner.lookup_tensor(req.dest_index).dtype != record.dtype:
                    declined.append(req)
                    continue
                target = planner.resolve_tensor(req).detach()
                source = narrow_tensor_by_index(byte_view(buffer, info.offset, record),
                                                req.storage_offsets, req.lengths)
                if source.shape[:-1] != target.shape:
                    raise AssertionError(f"{relative_path}: record {req.storage_index} has shape "
                                         f"{tuple(source.shape[:-1])}, the target "
                                         f"{tuple(target.shape)}")
                target.unsqueeze(-1).view(torch.uint8).copy_(source)
                self.copied += 1
                planner.commit_tensor(req, target)
            return declined

    return MappedFileSystemReader

