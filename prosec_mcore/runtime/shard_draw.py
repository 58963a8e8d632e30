"""Draw only this rank's tensor-parallel shard of a normally initialised weight, bit for bit.

The layout-independent initialisation (``init.py``) defines a weight as: the FULL float32 tensor
filled by ``torch.nn.init.normal_`` from the CPU generator seeded per parameter, then split as
megatron splits a master weight. Drawing the full tensor on every rank costs its full size in
memory (a 126k x 4096 embedding is 2 GB of float32 per rank). This module computes the same
values for this rank's part only, holding at most one bounded chunk besides the output.

How PyTorch fills a contiguous float32 CPU tensor of ``n >= 16`` elements with ``normal_``
(aten/src/ATen/native/cpu/DistributionTemplates.h, ``normal_fill``; the AVX2 build vectorises the
same per-block transform):

1. element i receives uniform number i: one 32-bit output of the mt19937 generator each;
2. each 16-element block [16k, 16k + 16) is turned into normals by Box-Muller from its own 16
   uniforms only (u1 = elements 0-7, u2 = elements 8-15 of the block);
3. when ``n % 16 != 0`` the LAST 16 elements [n - 16, n) are recomputed from 16 fresh uniforms
   (outputs n .. n + 15 of the generator), overwriting the tail of the last full block.

So the value at position p depends only on p's block and on how many generator outputs precede
that block. ``NormalStream`` reproduces it for increasing ranges of positions: it skips the
uniforms before a range (``uint8.random_`` consumes one 32-bit output per element, in bounded
scratch chunks), runs the same ``normal_`` on a buffer aligned to the full tensor's 16-blocks
(a call on a multiple of 16 elements consumes exactly that many outputs and transforms whole
blocks), remembers the last block for a next range that starts inside it, and draws the
recomputed tail block last. Tensors under 16 elements take another path in PyTorch (a
per-element normal distribution); they are tiny and drawn in full by the caller.

A tensor-parallel shard in flat (row-major) order is a regular pattern of the full tensor:
splitting dim d of the full shape into ``tp_size * stride`` pieces of ``chunk`` and keeping
pieces ``rank, rank + tp_size, ...`` keeps, for each of the ``prod(shape[:d]) * stride`` "rows",
``row_elements = chunk * prod(shape[d+1:])`` contiguous elements at ``offset = rank *
row_elements`` inside a "period" of ``tp_size * row_elements`` elements (``ShardPattern``). A row
split (dim 0) is a few long rows; a column split (dim 1) is one short row per matrix row.

Cost: memory O(shard + chunk); time O(full tensor) of generator outputs on every rank (each
output must be produced to reach the next, as in the full draw), but the Box-Muller transform
runs only on the drawn ranges (for short periods, on whole groups of periods).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch

BLOCK = 16  # normal_'s Box-Muller block (DistributionTemplates.h)
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per drawn chunk


def normal_parameters(init_fn: Callable) -> tuple[float, float] | None:
    """(mean, std) when `init_fn` is ``torch.nn.init.normal_`` with fixed mean and std (what
    megatron's ``init_method_normal``/``scaled_init_method_normal`` return), else None: another
    init function cannot be drawn shard by shard and needs the full draw."""
    if not isinstance(init_fn, functools.partial) or init_fn.func is not torch.nn.init.normal_:
        return None
    if init_fn.args or not set(init_fn.keywords) <= {"mean", "std"}:
        return None
    return float(init_fn.keywords.get("mean", 0.0)), float(init_fn.keywords.get("std", 1.0))


class ShardPattern(NamedTuple):
    """Where one rank's shard lies in the flattened full tensor: `rows` runs of `row_elements`
    elements, run i starting at ``i * period + offset``; the shard holds the runs in order."""
    numel: int  # of the full tensor
    rows: int
    row_elements: int
    period: int
    offset: int


def shard_pattern(full_shape, partition_dim: int | None, stride: int, tp_rank: int, tp_size: int) -> ShardPattern:
    """The shard megatron keeps of a master weight of `full_shape` split along `partition_dim`
    (None: not split) into chunks of ``shape[dim] / tp_size / stride`` (layers.py:
    ``_initialize_affine_weight_cpu``): chunks ``tp_rank::tp_size``."""
    numel = math.prod(full_shape)
    if partition_dim is None or tp_size == 1:
        return ShardPattern(numel, 1, numel, numel, 0)
    size = full_shape[partition_dim]
    if size % (tp_size * stride):
        raise ValueError(f"dimension {partition_dim} of {list(full_shape)} does not split into {tp_size} ranks "
                         f"x stride {stride}")
    row_elements = size // (tp_size * stride) * math.prod(full_shape[partition_dim + 1:])
    rows = math.prod(full_shape[:partition_dim]) * stride
    return ShardPattern(numel, rows, row_elements, tp_size * row_elements, tp_rank * row_elements)


class NormalStream:
    """The values of ``torch.empty(numel).normal_(mean, std)`` drawn with a generator seeded by
    `seed`, read range by range in increasing, non-overlapping order (module docstring)."""

    def __init__(self, numel: int, mean: float, std: float, seed: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        if numel < BLOCK:
            raise ValueError(f"NormalStream needs at least {BLOCK} elements (normal_ draws fewer differently)")
        self.numel, self.mean, self.std = numel, mean, std
        self.generator = torch.Generator().manual_seed(seed)
        self.chunk_elements = chunk_elements
        # positions >= tail_start hold the recomputed last block (when numel % 16 != 0)
        self.tail_start = numel - BLOCK if numel % BLOCK else numel
        self.consumed = 0       # generator outputs used so far (block-aligned until the tail)
        self.position = 0       # where the previous read ended; reads never go back
        self.last_block = None  # values of the block [consumed - 16, consumed)
        self.tail = None

    def read(self, start: int, stop: int) -> torch.Tensor:
        """float32 values of positions [start, stop) of the full tensor (start >= previous stop)."""
        if start < self.position or stop > self.numel or stop <= start:
            raise ValueError(f"NormalStream.read({start}, {stop}): ranges must increase inside [0, {self.numel})")
        self.position = stop
        parts = []
        if start < self.tail_start:
            parts.append(self._read_blocks(start, min(stop, self.tail_start)))
        if stop > self.tail_start:
            tail = self._tail_block()
            parts.append(tail[max(start, self.tail_start) - self.tail_start:stop - self.tail_start])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _skip_to(self, position: int) -> None:
        """Advance the generator to output `position` (uint8 random_ takes one 32-bit output per element)."""
        count = position - self.consumed
        if count > 0:
            scratch = torch.empty(min(count, self.chunk_elements), dtype=torch.uint8)
            while count > 0:
                step = min(count, scratch.numel())
                scratch[:step].random_(generator=self.generator)
                count -= step
        self.consumed = position

    def _read_blocks(self, start: int, stop: int) -> torch.Tensor:
        first = start // BLOCK * BLOCK
        end = -(-stop // BLOCK) * BLOCK
        buffer = torch.empty(end - first, dtype=torch.float32)
        if first < self.consumed:  # the range starts inside the block the previous read drew
            assert first == self.consumed - BLOCK, (first, self.consumed)
            buffer[:BLOCK] = self.last_block
            fresh = buffer[BLOCK:]
        else:
            self._skip_to(first)
            fresh = buffer
        if fresh.numel():  # a multiple of 16 elements: whole blocks, as in the full draw
            fresh.normal_(self.mean, self.std, generator=self.generator)
        self.consumed = end
        self.last_block = buffer[-BLOCK:].clone()
        return buffer[start - first:stop - first]

    def _tail_block(self) -> torch.Tensor:
        if self.tail is None:
            self._skip_to(self.numel)
            self.tail = torch.empty(BLOCK, dtype=torch.float32).normal_(self.mean, self.std, generator=self.generator)
            self.consumed = self.numel + BLOCK
        return self.tail


@torch.no_grad()
def draw_normal_shard(out: torch.Tensor, pattern: ShardPattern, mean: float, std: float, seed: int,
                      chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
    """Fill `out` (this rank's shard, contiguous, any dtype/device) with its part of the full
    tensor ``normal_(mean, std)`` seeded by `seed`; equal bit for bit to drawing the full float32
    tensor, slicing it and copying the slice into `out`."""
    if out.numel() != pattern.rows * pattern.row_elements or not out.is_contiguous():
        raise ValueError(f"draw_normal_shard: out has {out.numel()} elements (contiguous: {out.is_contiguous()}), "
                         f"the shard {pattern.rows} x {pattern.row_elements}")
    stream = NormalStream(pattern.numel, mean, std, seed, chunk_elements)
    flat = out.view(-1)
    width, period, offset = pattern.row_elements, pattern.period, pattern.offset
    rows_per_read = chunk_elements // period
    if rows_per_read >= 1:  # short periods: read whole groups of rows, gaps included, and pick the rows
        for row in range(0, pattern.rows, rows_per_read):
            count = min(rows_per_read, pattern.rows - row)
            start = row * period + offset
            values = stream.read(start, start + (count - 1) * period + width)
            picked = values.as_strided((count, width), (period, 1), values.storage_offset())
            flat[row * width:(row + count) * width].view(count, width).copy_(picked)
        return
    for row in range(pattern.rows):  # long periods: skip to each row and read it in chunks
        for begin in range(0, width, chunk_elements):
            stop = min(begin + chunk_elements, width)
            start = row * period + offset
            flat[row * width + begin:row * width + stop].copy_(stream.read(start + begin, start + stop))
