"""Safetensors weights of a Hugging Face folder, read and written one tensor at a time.

Reading (`iter_tensors`) opens each shard with `safe_open` and materialises one tensor at a time,
so converting a 16 GB checkpoint holds one tensor of it (plus the model being filled), not all of
it. Writing (`ShardWriter`) collects tensors until a shard would exceed `max_shard_size`, writes
the shard, and forgets it; with more than one shard it names them as the hub does
(model-00001-of-00006.safetensors) next to a model.safetensors.index.json whose weight_map names
each tensor's shard, which `from_pretrained` and this module's reader both follow.

dtypes are named as users type them (bf16, fp16, fp32) or as config.json's torch_dtype does
(bfloat16, float16, float32).
"""
from __future__ import annotations

import json
import os
import re

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TORCH_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
SAFETENSORS_NAMES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default


def parse_dtype(name: str) -> torch.dtype:
    """'bf16' / 'bfloat16' / ... -> torch dtype; a ValueError naming the choices otherwise."""
    by_name = {**DTYPES, **{v: k for k, v in TORCH_NAMES.items()}}
    if name not in by_name:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return by_name[name]


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KB' (powers of 1000, as transformers reads them), or bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"shard size {text!r} is not a size like 5GB, 500MB or 2000000")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def weight_files(hf_dir: str) -> list[str]:
    """The folder's weight files: model.safetensors, the shards its index lists, or
    pytorch_model.bin."""
    single = os.path.join(hf_dir, SINGLE)
    if os.path.exists(single):
        return [single]
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            return [os.path.join(hf_dir, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    legacy = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.exists(legacy):
        return [legacy]
    raise FileNotFoundError(f"{hf_dir} has neither model.safetensors, {INDEX} nor pytorch_model.bin")


def iter_tensors(hf_dir: str):
    """Yield (name, tensor) for every weight of the folder, one tensor in memory at a time
    (pytorch_model.bin, a single pickle, is memory-mapped)."""
    from safetensors import safe_open

    for path in weight_files(hf_dir):
        if path.endswith(".bin"):
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
            continue
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def stored_dtype(hf_dir: str) -> torch.dtype | None:
    """The floating dtype the folder's weights are stored in (that of its first float tensor)."""
    from safetensors import safe_open

    path = weight_files(hf_dir)[0]
    if path.endswith(".bin"):
        return None
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            dtype = SAFETENSORS_NAMES.get(f.get_slice(name).get_dtype())
            if dtype is not None:
                return dtype
    return None


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_bytes` each (a single tensor larger
    than that gets a shard of its own), then name them as the hub does and write the index."""

    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names)
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.out_dir, f".shard-{len(self.files):05d}.tmp")
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Finish: model.safetensors (one shard) or model-0000i-of-0000N.safetensors + index.
        Returns the file names written."""
        if self.pending or not self.files:
            self._flush()
        for stale in [SINGLE, INDEX] + [f for f in os.listdir(self.out_dir) if re.fullmatch(
                r"model-\d{5}-of-\d{5}\.safetensors", f)]:
            if os.path.exists(os.path.join(self.out_dir, stale)):  # an earlier export into this folder
                os.remove(os.path.join(self.out_dir, stale))
        count = len(self.files)
        names = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for (tmp, tensors), name in zip(self.files, names):
            os.replace(tmp, os.path.join(self.out_dir, name))
            weight_map.update({t: name for t in tensors})
        if count > 1:
            with open(os.path.join(self.out_dir, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
            names.append(INDEX)
        return names
