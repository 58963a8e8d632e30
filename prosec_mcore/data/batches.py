"""Deterministic, resumable global batches over any sample source.

Batches
-------
Iteration ``k`` consumes the global batch of samples ``k*G .. k*G+G-1`` (wrapped
modulo the dataset length).  Data-parallel rank ``r`` of ``D`` owns the
contiguous slice ``r*G/D .. (r+1)*G/D - 1`` of it and feeds it to the model in
micro-batches of ``m`` samples, in order.  Because the sample index depends only
on ``(iteration, position)``, the union of all ranks' micro-batches is the same
global batch for any ``D``, and restarting at ``start_iteration=k`` reproduces
exactly the batches an uninterrupted run would have seen.

A source is anything with ``source[i] -> {"tokens": LongTensor [L], ...}``: a megatron
``GPTDataset`` or ``BlendedDataset`` (finite: the index wraps modulo its length) or a shard stream
(``endless = True``: every index is a new sample, data/shard_dataset.py).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

SFT_MASKS = ("prompt_mask", "pad_mask")  # [m, L] bool, stacked when the source gives them


class GlobalBatchIterator:
    """Iterator over this DP rank's micro-batches, iteration after iteration (see module
    docs); ``next()`` it ``num_microbatches`` times per training step, as megatron's
    forward-backward schedules do.

    Each micro-batch is a dict of LongTensors: ``tokens [m, L]``, ``sample_index [m]``
    (``iteration * G + position``; the dataset index is that modulo ``len(dataset)``, or
    that itself for an endless source),
    ``batch_position [m]`` (0..G-1) and ``global_batch_index [m]`` (the iteration), plus
    ``labels [m]`` when per-document ``labels`` are given (see :func:`load_document_labels`),
    and the BoolTensors ``prompt_mask [m, L]`` and ``pad_mask [m, L]`` when the source's samples
    carry them (SFT data, data/sft.py).
    Iterates forever unless ``end_iteration`` is given (exclusive).
    """

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, start_iteration: int = 0, end_iteration: Optional[int] = None,
                 labels: Optional[np.ndarray] = None):
        G, m = global_batch_size, micro_batch_size
        if G < 1 or m < 1 or dp_size < 1:
            raise ValueError("global_batch_size, micro_batch_size and dp_size must be >= 1")
        if G % dp_size:
            raise ValueError(f"global_batch_size ({G}) must be divisible by the data-parallel "
                             f"size ({dp_size})")
        if (G // dp_size) % m:
            raise ValueError(f"global_batch_size / dp_size ({G} / {dp_size} = {G // dp_size}) "
                             f"must be divisible by micro_batch_size ({m})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if start_iteration < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration}")
        if dataset is None or (not getattr(dataset, "endless", False) and len(dataset) == 0):
            raise ValueError("cannot iterate over an empty (or missing) dataset")
        self.dataset = dataset
        self.global_batch_size, self.micro_batch_size = G, m
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = G // dp_size
        self.num_microbatches = self.per_rank // m
        self.iteration = start_iteration  # the iteration the next micro-batch belongs to
        self._next_micro = 0  # index of the next micro-batch within that iteration
        self.end_iteration = end_iteration
        self.labels = labels

    def microbatch(self, iteration: int, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` (0..num_microbatches-1) of this rank at ``iteration``."""
        first = self.dp_rank * self.per_rank + index * self.micro_batch_size
        positions = torch.arange(first, first + self.micro_batch_size, dtype=torch.long)
        sample_index = iteration * self.global_batch_size + positions
        endless = getattr(self.dataset, "endless", False)
        n = None if endless else len(self.dataset)
        samples = [self.dataset[int(i) if endless else int(i) % n] for i in sample_index]
        batch = {
            "tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long(),
            "sample_index": sample_index,
            "batch_position": positions,
            "global_batch_index": torch.full_like(positions, iteration),
        }
        for key in SFT_MASKS:  # SFT samples (data/sft.py): which positions are prompt, which padding
            if key in samples[0]:
                batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).bool()
        if self.labels is not None:
            docs = [sample_document(self.dataset, int(i) % n) for i in sample_index]
            batch["labels"] = torch.as_tensor(self.labels[docs], dtype=torch.long)
        return batch

    def microbatches(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        """All of this rank's micro-batches of one iteration, in order."""
        return [self.microbatch(iteration, j) for j in range(self.num_microbatches)]

    def __iter__(self) -> "GlobalBatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.end_iteration is not None and self.iteration >= self.end_iteration:
            raise StopIteration
        batch = self.microbatch(self.iteration, self._next_micro)
        self._next_micro += 1
        if self._next_micro == self.num_microbatches:
            self.iteration, self._next_micro = self.iteration + 1, 0
        return batch


def make_batch_iterator(dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int, start_iteration: int = 0, end_iteration: Optional[int] = None,
                        labels: Optional[np.ndarray] = None) -> GlobalBatchIterator:
    """Convenience constructor for :class:`GlobalBatchIterator`."""
    return GlobalBatchIterator(dataset, global_batch_size, micro_batch_size, dp_rank, dp_size,
                               start_iteration, end_iteration, labels)


def sample_document(dataset, index: int) -> int:
    """The (global) document id that sample ``index`` of a ``GPTDataset`` comes from; labels
    belong to documents, so a labelled sample must lie inside one document. Reads megatron-core
    0.16.1's sample index: the (document position, offset) where the sample starts and ends; a
    document that contributes no token (the sample starts at its very end) does not count."""
    position = dataset.shuffle_index[index]
    begin, begin_offset = dataset.sample_index[position]
    end, end_offset = dataset.sample_index[position + 1]
    contributing = []
    for i in range(int(begin), int(end) + 1):
        doc = int(dataset.document_index[i])
        stop = end_offset if i == end else dataset.dataset.sequence_lengths[doc]
        start = begin_offset if i == begin else 0
        if stop > start:
            contributing.append(doc)
    if len(contributing) != 1:
        raise ValueError(f"sample {index} spans documents {contributing}: per-document labels need documents of "
                         f"exactly seq_length tokens (one sample each), as QM9's")
    return contributing[0]


def load_document_labels(path: str, dataset, num_classes: int) -> np.ndarray:
    """An int array with one class label per document of the indexed dataset (``.npy``),
    checked against the dataset's document count and ``model.num_classes``."""
    if not os.path.isfile(path):
        raise ValueError(f"data.labels={path} does not exist; write one label per document "
                         f"(e.g. `python tools/prepare_data.py --dataset qm9 --labels qed`)")
    labels = np.load(path)
    n_docs = len(dataset.dataset.sequence_lengths)
    if labels.ndim != 1 or len(labels) != n_docs:
        raise ValueError(f"data.labels={path} holds {labels.shape} labels; the dataset has {n_docs} documents")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"data.labels={path} has labels in [{labels.min()}, {labels.max()}] but "
                         f"model.num_classes={num_classes}")
    return labels.astype(np.int64)
