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

Blends
------
:func:`build_datasets` also takes a :class:`~prosec_mcore.data.blends.DataSources`: several
indexed datasets blended by weight (Megatron-LM's ``--data-path w1 prefix1 w2 prefix2``), cut by
``data.split`` or given per split.  megatron-core's builder then returns ``BlendedDataset``
objects; data/blends.py parses the config lists and checks every prefix and split first.

Batches are drawn by data/batches.py.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from prosec_mcore.data.blends import DataSources

PREPARE_HINT = "Create them with `python tools/prepare_data.py` (or tools/preprocess_data.py)."
RECREATE_HINT = "re-copy it or re-create it with tools/preprocess_data.py (or tools/prepare_data.py)"
_IDX_MAGIC = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
_IDX_HEADER_BYTES = 34  # magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
# Hydra reads an unquoted comma list as a sweep: the override needs quotes the shell leaves alone.
_VALID_FIX = "give the validation split documents, e.g. \"data.split='90,10,0'\", or set train.eval_interval=0"


def scan_max_token_id(bin_path: str, dtype) -> int:
    """Largest token id in a non-empty ``.bin`` file, scanned in chunks of a memmap."""
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    chunk = 1 << 26
    max_id = max(int(data[i:i + chunk].max()) for i in range(0, data.size, chunk))
    del data
    return max_id


def vocabulary_mismatch(data_prefix: str, max_id: int, vocab_size: int) -> str:
    """The one-line message for data holding a token id the tokenizer does not have."""
    return (f"the tokenizer does not match the data: {data_prefix}.bin contains token id {max_id} "
            f"but the tokenizer has vocab_size={vocab_size}. Use the tokenizer the data "
            f"was preprocessed with, or re-run preprocessing with this tokenizer.")


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
    max_id = scan_max_token_id(bin_path, dtype)
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
        raise ValueError(vocabulary_mismatch(data_prefix, max_id, tokenizer.vocab_size))
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


def build_datasets(data_prefix: Union[str, "DataSources"], tokenizer, seq_length: int,
                   split: Optional[str], seed: int, num_samples: tuple[int, int, int], cache_dir: str):
    """Build ``(train, valid, test)`` megatron ``GPTDataset`` objects of exactly
    ``seq_length`` tokens per sample (``dataset[i]["tokens"]``).

    ``data_prefix`` is one indexed dataset prefix, or a :class:`~prosec_mcore.data.blends.DataSources`
    (a blend, data/blends.py) carrying its own split string: ``split`` must then be ``None`` or
    the same (per-split blends use no split string and ignore it).  A blend of several prefixes
    gives megatron ``BlendedDataset`` objects (see :func:`_build_blended_datasets`); a
    ``DataSources`` of one prefix takes the single-prefix path below, unchanged.

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
    from megatron.core.datasets.gpt_dataset import GPTDataset

    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative ints, got {num_samples}")
    if not isinstance(data_prefix, str):
        from prosec_mcore.data.blends import is_single_prefix

        sources = data_prefix
        if split is not None and sources.blend is not None and split != sources.split:
            raise ValueError(f"build_datasets was given split={split!r} and data sources with split "
                             f"{sources.split!r}; pass split=None (the sources carry theirs)")
        if not is_single_prefix(sources):
            return _build_blended_datasets(sources, tokenizer, seq_length, seed, num_samples, cache_dir)
        data_prefix, split = sources.blend[0][0], sources.split
    indexed = validate_indexed_dataset(data_prefix, tokenizer, cache_dir)

    config = _gpt_dataset_config(seed, seq_length, cache_dir, tokenizer, blend=([data_prefix], None),
                                 split=split)
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


def _gpt_dataset_config(seed: int, seq_length: int, cache_dir: str, tokenizer, **data):
    """megatron's ``GPTDatasetConfig`` for diffusion samples: exactly ``seq_length`` tokens, no
    causal mask, the tokenizer without a pad id; ``data`` is ``blend``/``blend_per_split``/``split``."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=cache_dir,
        tokenizer=_WithoutPadding(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
        **data,
    )


@contextmanager
def _process_group_for_index_build():
    """megatron-core 0.16.1's ``BlendedDataset`` asks ``torch.distributed`` for the rank before it
    writes its index cache, even in a single process.  Without a process group (a script, a test)
    a one-process gloo group over an in-memory store is opened for the build and closed after."""
    dist = torch.distributed
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _build_blended_datasets(sources: "DataSources", tokenizer, seq_length: int, seed: int,
                            num_samples: tuple[int, int, int], cache_dir: str):
    """``(train, valid, test)`` of a blend of several prefixes, built by megatron-core's
    ``BlendedMegatronDatasetBuilder`` (``BlendedDataset`` objects; a ``GPTDataset`` for a split
    whose blend holds one prefix; ``None`` for a split not built).  Before any index is built,
    every prefix is checked (data/blends.py: ``read_blend_metadata``, one line per bad prefix)
    and so is every split the run reads (``plan_blend_build``, one line per short prefix)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from prosec_mcore.data.blends import SPLIT_NAMES, plan_blend_build, read_blend_metadata

    metadata = read_blend_metadata(sources.prefixes, tokenizer, cache_dir)
    plan = plan_blend_build(sources, metadata, seq_length, num_samples)
    config = _gpt_dataset_config(seed, seq_length, cache_dir, tokenizer, blend=plan.blend,
                                 blend_per_split=plan.blend_per_split, split=plan.split)
    for i in plan.not_built:
        config.split_matrix[i] = None
    builder = BlendedMegatronDatasetBuilder(GPTDataset, plan.sizes, lambda: True, config)
    with _process_group_for_index_build():
        datasets = builder.build()
    for i in (0, 1) if num_samples[1] > 0 else (0,):  # plan_blend_build should make this unreachable
        if datasets[i] is None or len(datasets[i]) == 0:
            raise ValueError(f"the blend {sources.describe()} yields no {SPLIT_NAMES[i]} sample of "
                             f"data.seq_length={seq_length} tokens; use more data or a shorter data.seq_length")
    return tuple(datasets)
