"""New weights from a path: one safetensors file, or every `*.safetensors` file of a folder (an HF
checkpoint). Every file is opened, and so checked whole, before any tensor is read: a missing,
truncated or corrupt file fails the update before anything is written. Pickled checkpoints
(`.bin`) are not read: loading them runs code from the file.
"""

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from protocol.weights import DTYPE_SIZES, TensorSpec
from worker.weights import Target, WeightError

SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64", "BF16": "bfloat16", "F16": "float16"}


@dataclass(frozen=True)
class FileTensor:
    spec: TensorSpec
    file: str


def checkpoint_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise WeightError(f"no such file or folder: {path}")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise WeightError(f"no .safetensors files in {path}")
    return files


def file_tensors(path: str) -> list[FileTensor]:
    """Every tensor of the checkpoint at `path`, with its spec; WeightError for a bad file."""
    tensors: dict[str, FileTensor] = {}
    for file in checkpoint_files(path):
        for tensor in _tensors_of(file):
            if tensor.spec.name in tensors:
                raise WeightError(f"tensor {tensor.spec.name!r} is in both {tensors[tensor.spec.name].file} and {file}")
            tensors[tensor.spec.name] = tensor
    return list(tensors.values())


def _tensors_of(file: str) -> list[FileTensor]:
    try:
        with safe_open(file, framework="pt") as handle:
            found = []
            for name in handle.keys():
                piece = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise WeightError(
                        f"tensor {name!r} in {file} is {piece.get_dtype()}: not one of {', '.join(DTYPE_SIZES)}"
                    )
                found.append(FileTensor(TensorSpec(name, dtype, tuple(piece.get_shape())), file))
            return found
    except (SafetensorError, OSError) as error:
        raise WeightError(f"cannot read {file}: {error}") from None


def read_tensors(tensors: list[FileTensor], targets: list[Target]) -> Iterator[tuple[Target, torch.Tensor]]:
    """Each target with this rank's part of its value (the shard only, under tensor parallelism)."""
    file_of = {t.spec.name: t.file for t in tensors}
    by_file: dict[str, list[Target]] = {}
    for target in targets:
        by_file.setdefault(file_of[target.spec.name], []).append(target)
    for file, file_targets in by_file.items():
        try:
            with safe_open(file, framework="pt") as handle:
                for target in file_targets:
                    if target.index is None:
                        yield target, handle.get_tensor(target.spec.name)
                    else:
                        yield target, handle.get_slice(target.spec.name)[target.index]
        except SafetensorError as error:
            raise WeightError(f"cannot read {file}: {error}") from None
