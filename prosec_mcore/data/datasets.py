"""Train/valid/test datasets and a deterministic, resumable global-batch iterator.

Datasets
--------
We reuse megatron-core's ``GPTDataset`` through ``BlendedMegatronDatasetBuilder``:

* the documents of one indexed dataset are split into train/valid/test by
  *document* ranges according to a split string such as ``"969,30,1"``;
* each split shuffles its documents, concatenates them (EOD ids between them)
  and cuts the token stream into samples, repeating epochs until the requested
  number of samples exists; the sample order is shuffled too;
* the three index arrays behind this are cached as ``.npy`` files under
  ``cache_dir`` and reused by later runs with the same data/seed/length.

An autoregressive LM needs ``L + 1`` tokens per sample (inputs shifted against
labels).  A masked diffusion LM predicts masked positions in place, so every
sample is *exactly* ``L`` tokens: ``add_extra_token_to_sequence=False``.  We also
skip building causal attention masks (``create_attention_mask=False``).

The builder works without ``torch.distributed`` (one process).  Under torchrun
every rank must call :func:`build_datasets`; global rank 0 builds and caches the
indices, a barrier follows, and the other ranks load the cache.

Start-up checks
---------------
Bad data is refused before any training work, with a one-line ``ValueError`` (or
``FileNotFoundError``) that names the file and the fix:

* :func:`check_indexed_dataset_files` reads only the 34-byte ``.idx`` header and the
  last document's length/pointer (O(1), whatever the corpus size): an ``.idx`` that is
  not a megatron index (bad magic, version or dtype code, too short for its counts), a
  ``.bin`` whose size is not a multiple of the token size, or a ``.bin`` shorter
  (truncated copy) or longer (files from different runs) than the ``.idx`` describes;
* :func:`validate_indexed_dataset` adds: no documents/tokens, token ids outside the
  tokenizer's vocabulary;
* :func:`build_datasets` refuses, before megatron builds any index, a train split, or a
  valid split asked for samples (``num_samples[1] > 0``), that gets no documents from
  ``data.split`` (a 0 share, or too few documents to round to one) or whose documents
  hold fewer tokens than one sample of ``seq_length`` (megatron would fill the samples
  by repeating those few tokens epoch after epoch).

Batches
-------
Iteration ``k`` consumes the global batch of samples ``k*G .. k*G+G-1`` (wrapped
modulo the dataset length).  Data-parallel rank ``r`` of ``D`` owns the
contiguous slice ``r*G/D .. (r+1)*G/D - 1`` of it and feeds it to the model in
micro-batches of ``m`` samples, in order.  Because the sample index depends only
on ``(iteration, position)``, the union of all ranks' micro-batches is the same
global batch for any ``D``, and restarting at ``start_iteration=k`` reproduces
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from typing import Optional

import numpy as np
import torch

PREPARE_HINT = "Create them with `python tools/prepare_data.py` (or tools/preprocess_data.py)."
RECREATE_HINT = "re-copy it or re-create it with tools/preprocess_data.py (or tools/prepare_data.py)"
_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
_IDX_HEADER_BYTES = 34  # magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
# Hydra reads an unquoted comma list as a sweep: the override needs quotes the shell leaves alone.
_VALID_FIX = "give the validation split documents, e.g. \"data.split='90,10,0'\", or set train.eval_interval=0"


def _max_token_id(bin_path: str, dtype, cache_dir: str) -> int:
    """Largest token id in a ``.bin`` file, scanned in chunks of a memmap and cached in
    ``cache_dir`` (keyed by file size and mtime) so large corpora are scanned once."""
    st = os.stat(bin_path)
    key = {"bin": os.path.abspath(bin_path), "size": st.st_size, "mtime": st.st_mtime_ns}
    cache_file = os.path.join(cache_dir, os.path.basename(bin_path) + ".max_token_id.json")
    try:
        with open(cache_file) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return int(cached["max_token_id"])
    except (OSError, ValueError, KeyError):
        pass
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    chunk = 1 << 26
    max_id = max(int(data[i:i + chunk].max()) for i in range(0, data.size, chunk))
    del data
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache_file}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"key": key, "max_token_id": max_id}, f)
    os.replace(tmp, cache_file)
    return max_id


def check_indexed_dataset_files(data_prefix: str) -> dict:
    """Check that ``<data_prefix>.bin/.idx`` exist and agree, cheaply (file sizes, the ``.idx``
    header and the last document's length and pointer; nothing is scanned).

    Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` naming the
    file and the fix for an ``.idx`` that is not a megatron-core index (bad magic, version or
    dtype code, shorter than its counts need, inconsistent document indices) and for a
    ``.bin`` whose size is not a multiple of the token size or differs from the byte length
    the ``.idx`` describes (truncated copy, or files from different runs).  Returns
    ``{"dtype", "sequences", "documents", "bin_bytes"}``.
    """
    from megatron.core.datasets.indexed_dataset import DType

    bin_path, idx_path = data_prefix + ".bin", data_prefix + ".idx"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"indexed dataset file(s) not found: {missing}. {PREPARE_HINT}")
    idx_bytes = os.path.getsize(idx_path)

    def not_an_index(why: str) -> ValueError:
        return ValueError(f"{idx_path} is not a megatron-core index ({why}); {RECREATE_HINT}")

    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER_BYTES)
        if len(head) < _IDX_HEADER_BYTES:
            raise not_an_index(f"{idx_bytes:,} bytes, shorter than the {_IDX_HEADER_BYTES}-byte header")
        if head[:9] != _IDX_MAGIC:
            raise not_an_index(f"bad magic {head[:9]!r}, expected {_IDX_MAGIC!r}")
        version, code = struct.unpack("<QB", head[9:18])
        if version != 1:
            raise not_an_index(f"version {version}, expected 1")
        try:
            dtype = DType.dtype_from_code(code)
        except (KeyError, ValueError):
            raise not_an_index(f"unknown token dtype code {code}") from None
        n_seq, n_doc = struct.unpack("<QQ", head[18:34])
        if n_doc == 0:  # megatron always writes the document boundary 0
            raise not_an_index("no document boundaries")
        need = _IDX_HEADER_BYTES + 12 * n_seq + 8 * n_doc  # int32 lengths, int64 pointers, int64 doc indices
        if idx_bytes < need:
            raise ValueError(f"{idx_path} holds {idx_bytes:,} bytes but its header describes {n_seq:,} "
                             f"sequences and {n_doc - 1:,} documents ({need:,} bytes) (truncated copy?); "
                             f"{RECREATE_HINT}")
        itemsize = DType.size(dtype)
        if n_seq == 0:
            expected = 0
        else:
            f.seek(_IDX_HEADER_BYTES + 4 * (n_seq - 1))
            (last_length,) = struct.unpack("<i", f.read(4))
            f.seek(_IDX_HEADER_BYTES + 4 * n_seq + 8 * (n_seq - 1))
            (last_pointer,) = struct.unpack("<q", f.read(8))
            f.seek(_IDX_HEADER_BYTES + 12 * n_seq + 8 * (n_doc - 1))
            (last_doc,) = struct.unpack("<q", f.read(8))
            if last_length < 0 or last_pointer < 0 or last_pointer % itemsize or last_doc != n_seq:
                raise not_an_index(f"inconsistent index: last sequence length {last_length}, pointer "
                                   f"{last_pointer}, last document boundary {last_doc} of {n_seq} sequences")
            expected = last_pointer + last_length * itemsize
    bin_bytes = os.path.getsize(bin_path)
    if bin_bytes % itemsize:
        raise ValueError(f"{bin_path} holds {bin_bytes:,} bytes, not a multiple of the {itemsize}-byte "
                         f"{np.dtype(dtype).name} tokens {idx_path} names (truncated or foreign file?); "
                         f"{RECREATE_HINT}")
    if bin_bytes < expected:
        raise ValueError(f"{bin_path} holds {bin_bytes:,} bytes but {idx_path} describes {expected:,} "
                         f"(truncated copy?); {RECREATE_HINT}")
    if bin_bytes > expected:
        raise ValueError(f"{bin_path} holds {bin_bytes:,} bytes but {idx_path} describes only {expected:,} "
                         f"(the two files come from different runs?); re-create both with "
                         f"tools/preprocess_data.py (or tools/prepare_data.py)")
    return {"dtype": dtype, "sequences": n_seq, "documents": n_doc - 1, "bin_bytes": bin_bytes}


def validate_indexed_dataset(data_prefix: str, tokenizer, cache_dir: str):
    """Check that ``<data_prefix>.bin/.idx`` exist, agree (:func:`check_indexed_dataset_files`),
    are non-empty and fit the tokenizer.  Returns the opened megatron ``IndexedDataset``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    info = check_indexed_dataset_files(data_prefix)
    if info["sequences"] == 0 or info["bin_bytes"] == 0:  # (megatron cannot mmap an empty .bin)
        raise ValueError(f"indexed dataset {data_prefix} is empty (0 documents or 0 tokens)")
    try:
        indexed = IndexedDataset(data_prefix, mmap=True)
    except (AssertionError, ValueError, OSError) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"cannot open the indexed dataset {data_prefix}.bin/.idx ({detail}); "
                         f"{RECREATE_HINT}") from None
    n_docs = len(indexed.sequence_lengths)
    if n_docs == 0 or int(indexed.sequence_lengths.sum()) == 0:
        raise ValueError(f"indexed dataset {data_prefix} is empty (0 documents or 0 tokens)")
    max_id = _max_token_id(data_prefix + ".bin", indexed.index.dtype, cache_dir)
    if max_id >= tokenizer.vocab_size:
        raise ValueError(
            f"the tokenizer does not match the data: {data_prefix}.bin contains token id {max_id} "
            f"but the tokenizer has vocab_size={tokenizer.vocab_size}. Use the tokenizer the data "
            f"was preprocessed with, or re-run preprocessing with this tokenizer."
        )
    return indexed


class _WithoutPadding:
    """The tokenizer as megatron's ``GPTDataset`` should see it: without a pad id.

    ``GPTDataset`` treats the tokenizer's pad id as *its own* padding and rewrites every
    occurrence in a sample to 0. Our samples are never padded by megatron (a trailing partial
    sequence is dropped), but documents may contain pad ids on purpose (QM9: one molecule per
    sample, padded to the sequence length), and those must reach the model unchanged. So pad
    is reported as megatron's "no pad" value, which matches no real token.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    @property
    def pad(self) -> int:
        from megatron.core.datasets.megatron_dataset import _PAD_TOKEN_ID

        return _PAD_TOKEN_ID


def build_datasets(data_prefix: str, tokenizer, seq_length: int, split: str, seed: int,
                   num_samples: tuple[int, int, int], cache_dir: str):
    """Build ``(train, valid, test)`` megatron ``GPTDataset`` objects of exactly
    ``seq_length`` tokens per sample (``dataset[i]["tokens"]``).

    ``num_samples`` is the minimum number of samples per split; 0 means one epoch (pass 0
    for valid when validation is off).  The train split, and the valid split when asked for
    samples, must get documents holding at least ``seq_length`` tokens from ``split``, or a
    one-line ``ValueError`` names ``data.split``, the prefix and the fix.  Any other split
    that receives no documents (e.g. ``"1"`` of ``"969,30,1"`` on a 42-document corpus, or
    the 0 of ``"100,0,0"``) is returned as ``None``, with a warning when its share is not 0.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative ints, got {num_samples}")
    indexed = validate_indexed_dataset(data_prefix, tokenizer, cache_dir)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([data_prefix], None),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=_WithoutPadding(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
    )
    # megatron splits by document ranges rounded to whole documents (a 0 share is None in
    # split_matrix and built as None). A split asked for samples needs documents holding at
    # least one sample's tokens: with none, GPTDataset would loop forever looking for tokens;
    # with fewer, it would fill every sample by repeating those tokens epoch after epoch.
    # Check before megatron builds (and caches) any index.
    n_docs = len(indexed.sequence_lengths)
    names = ("train", "valid", "test")
    # train always, valid when validation reads it; test keeps the warning + None below
    needs_samples = (True, num_samples[1] > 0, False)
    for i, bookends in enumerate(config.split_matrix):
        wanted = needs_samples[i]
        beg, end = (0, 0) if bookends is None else (int(round(bookends[0] * n_docs)),
                                                     int(round(bookends[1] * n_docs)))
        n_split_docs = max(end - beg, 0)
        n_split_tokens = int(indexed.sequence_lengths[beg:end].sum()) if n_split_docs else 0
        if wanted and n_split_tokens < seq_length:
            raise ValueError(_split_error(names[i], data_prefix, split, seq_length, num_samples[i],
                                          n_docs, n_split_docs, n_split_tokens))
        if bookends is not None and n_split_docs == 0:
            warnings.warn(f"split {split!r} gives the {names[i]} split no documents out of "
                          f"{n_docs}; it is returned as None", stacklevel=2)
            config.split_matrix[i] = None

    sizes = [n if n > 0 else None for n in num_samples]
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config)
    datasets = builder.build()
    for i, ds in enumerate(datasets):  # the checks above should make this unreachable
        if needs_samples[i] and (ds is None or len(ds) == 0):
            raise ValueError(f"data.split={split} yields no {names[i]} sample of data.seq_length="
                             f"{seq_length} tokens from {data_prefix}; "
                             + (_VALID_FIX if i == 1 else "use a shorter data.seq_length or more data"))
    return tuple(datasets)


def _split_error(name: str, data_prefix: str, split: str, seq_length: int, requested: int,
                 n_docs: int, n_split_docs: int, n_split_tokens: int) -> str:
    """The one-line message for a split that cannot give one sample of ``seq_length`` tokens."""
    label = "validation" if name == "valid" else name
    if n_split_docs == 0:
        what = f"data.split={split} gives the {label} split of {data_prefix} no documents (of {n_docs})"
    else:
        what = (f"data.split={split} gives the {label} split of {data_prefix} {n_split_docs} "
                f"document(s) holding {n_split_tokens:,} tokens, fewer than one sample of "
                f"data.seq_length={seq_length}")
    if name == "train":
        return (f"{what}; give training more documents (the first share of data.split, "
                f"e.g. \"data.split='90,10,0'\"), use more data or a shorter data.seq_length")
    fix = _VALID_FIX if n_split_docs == 0 else (
        "give the validation split more documents (a larger second share of data.split, "
        "e.g. \"data.split='80,20,0'\", or more data), use a shorter data.seq_length, or set "
        "train.eval_interval=0")
    return f"{what}, but validation asks for {requested:,} samples; {fix}"


class GlobalBatchIterator:
    """Iterator over this DP rank's micro-batches, iteration after iteration (see module
    docs); ``next()`` it ``num_microbatches`` times per training step, as megatron's
    forward-backward schedules do.

    Each micro-batch is a dict of LongTensors: ``tokens [m, L]``, ``sample_index [m]``
    (``iteration * G + position``; the dataset index is that modulo ``len(dataset)``),
    ``batch_position [m]`` (0..G-1) and ``global_batch_index [m]`` (the iteration), plus
    ``labels [m]`` when per-document ``labels`` are given (see :func:`load_document_labels`).
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
        if dataset is None or len(dataset) == 0:
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
        n = len(self.dataset)
        tokens = torch.stack([self.dataset[int(i) % n]["tokens"] for i in sample_index])
        batch = {
            "tokens": tokens.long(),
            "sample_index": sample_index,
            "batch_position": positions,
            "global_batch_index": torch.full_like(positions, iteration),
        }
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
