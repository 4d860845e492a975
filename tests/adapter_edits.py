"""Reading and editing saved adapter files with safetensors alone, for the refusal tests."""

import safetensors
import safetensors.torch

from loratrf.adapter_file import adapter_digest


def raw(path):
    """The file's metadata and tensors."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path, edit, rehash=True):
    """Apply `edit(metadata, tensors)` to a saved file and, with `rehash`, re-sign it, so that
    only the edit is wrong."""
    metadata, tensors = raw(path)
    edit(metadata, tensors)
    if rehash:
        metadata["sha256"] = adapter_digest(metadata["plan"], tensors)
    path.write_bytes(safetensors.torch.save(tensors, metadata))
