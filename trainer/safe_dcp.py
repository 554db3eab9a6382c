"""Reading torch.distributed.checkpoint (DCP) checkpoints without unpickling code.

DCP's FileSystemReader loads a checkpoint's `.metadata` with `pickle.load`, and its default
load planner restores non-tensor items with `torch.load(weights_only=False)`: a crafted file
runs code in the trainer. torch 2.13 offers no non-pickle path for this format (its
HuggingFace safetensors reader keeps metadata in JSON but holds tensors only, and its own
weights-only unpickler does not read the protocol DCP writes), so:

  * `SafeReader.read_metadata` unpickles `.metadata` with an allow-list of exactly the
    classes DCP metadata is made of (its dataclasses, torch.Size, dtypes, layouts, paths):
    any other global is refused before it is looked up, so no callable outside the list can
    run. It also refuses storage entries whose file is not a plain name inside the
    checkpoint directory.
  * `SafePlanner.load_bytes` restores non-tensor items with `torch.load(weights_only=True)`.
  * Tensor data is already read with `torch.load(weights_only=True)` by FileSystemReader.

The manifest check (trainer/checkpoint.py) catches corrupt or edited files before this runs;
this module is what keeps a checkpoint written by someone else from running code.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._traverse import set_element


class UnsafeCheckpointError(ValueError):
    pass


def _allowed() -> dict[tuple[str, str], object]:
    classes = [md.Metadata, md.TensorStorageMetadata, md.BytesStorageMetadata, md.ChunkStorageMetadata,
               md.TensorProperties, md.MetadataIndex, md.StorageMeta, md._MEM_FORMAT_ENCODING, _StorageInfo,
               pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
               collections.OrderedDict]
    out = {(c.__module__, c.__qualname__): c for c in classes}
    out[("torch", "Size")] = torch.Size
    out[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name → layout lookup
    out.update({("torch", name): v for name, v in vars(torch).items() if isinstance(v, (torch.dtype, torch.layout,
                                                                                         torch.memory_format))})
    return out


ALLOWED = _allowed()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"checkpoint metadata refers to {module}.{name}, which DCP metadata never "
                                        f"holds (refused: unpickling it could run code)") from None


def load_metadata(stream) -> md.Metadata:
    try:
        metadata = _MetadataUnpickler(stream).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled
        raise UnsafeCheckpointError(f"unreadable checkpoint metadata ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, md.Metadata):
        raise UnsafeCheckpointError(f"checkpoint metadata holds a {type(metadata).__name__}, not DCP Metadata")
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", "")
        if not isinstance(rel, str) or not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise UnsafeCheckpointError(f"checkpoint metadata points at {rel!r}, not a file of the checkpoint")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with the allow-list above."""

    def read_metadata(self, *args, **kwargs) -> md.Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = load_metadata(f)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that restores non-tensor items with the weights-only unpickler."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
