"""Weighted blends of megatron indexed datasets: Megatron-LM's ``--data-path`` convention.

A run may train on several indexed datasets (``<prefix>.bin/.idx`` pairs) at once.  The
configuration names them the way Megatron-LM's ``--data-path`` does:

* ``data.data_path: [prefix1, prefix2, ...]`` blends the datasets in proportion to their
  sizes: megatron-core draws one epoch of each (the batch iterator wraps around it);
* ``data.data_path: [w1, prefix1, w2, prefix2, ...]`` draws sample ``k`` of the blend from
  dataset ``i`` with probability ``w_i / sum(w)`` (a deterministic interleaving: after ``n``
  samples dataset ``i`` has given ``round(n * w_i / sum(w))`` of them, give or take one);
* ``data.train_data_path`` / ``data.valid_data_path`` / ``data.test_data_path`` give each split
  its own blend (same two forms); every dataset of such a blend is used whole and
  ``data.split`` is not used.  Otherwise ``data.split`` cuts *each* dataset of the blend into
  train/valid/test document ranges, as it cuts a single dataset.

:func:`parse_blend` checks one such list and returns megatron-core's ``blend`` tuple
``(prefixes, weights)``; :func:`data_sources_from_config` reads the ``data`` config into a
:class:`DataSources` that ``build_datasets`` (data/datasets.py) hands to megatron-core's
``BlendedMegatronDatasetBuilder``: the result is a megatron ``BlendedDataset`` (one
``GPTDataset`` when there is one prefix).

Start-up checks
---------------
A blend may hold thousands of prefixes, and every one of them is checked before megatron builds
any index (:func:`validate_blend_prefixes`): present, ``.bin`` consistent with ``.idx``,
non-empty, token ids within the tokenizer.  All problems are collected into one ``ValueError``
with one line per bad prefix.  Checking a prefix reads its ``.idx`` header and scans its
``.bin`` once; the result is cached in one JSON file under the cache folder, keyed by the sizes
and modification times of both files, so re-opening a known blend costs two ``stat`` calls per
prefix.  :func:`plan_blend_build` then checks that every prefix gives each split the run reads at
least one sample of tokens (naming the prefix otherwise) and decides which splits to build.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from prosec_mcore.data.datasets import (
    _IDX_HEADER_BYTES,
    check_indexed_dataset_files,
    scan_max_token_id,
    vocabulary_mismatch,
)

Blend = tuple[list[str], Optional[list[float]]]  # megatron-core's (prefixes, weights or None)

SPLIT_NAMES = ("train", "valid", "test")
PER_SPLIT_KEYS = ("data.train_data_path", "data.valid_data_path", "data.test_data_path")
METADATA_FILE = "indexed_dataset_metadata.json"  # under the cache folder, one for all prefixes
MAX_LISTED_PROBLEMS = 50  # lines of one error message; the rest are counted
_FORMS = "[prefix1, prefix2, ...] or [weight1, prefix1, weight2, prefix2, ...]"
_LENGTH_CHUNK = 1 << 16  # document lengths read at a time when counting a split's tokens


# --- the config lists ----------------------------------------------------------------------

def _is_weight(item) -> bool:
    return isinstance(item, numbers.Real) and not isinstance(item, bool)


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_prefix(item, key: str, i: int) -> str:
    if not isinstance(item, str):
        raise ValueError(f"{key}[{i}]={item!r} is not a dataset prefix (a path string naming "
                         f"<prefix>.bin/.idx); {key} takes {_FORMS}")
    if not item.strip():
        raise ValueError(f"{key}[{i}] is an empty prefix; give the path of <prefix>.bin/.idx")
    return item.strip()


def parse_blend(value, key: str) -> Blend:
    """Check a blend list from the config and return megatron-core's ``(prefixes, weights)``.

    ``value`` is ``[prefix, ...]`` (weights ``None``: megatron blends by dataset size) or
    ``[w1, prefix1, w2, prefix2, ...]`` with numbers as weights and strings as prefixes.
    Weights are normalised to sum to 1 exactly as megatron-core does
    (``megatron.core.datasets.utils.normalize``: ``w / sum(w)`` in float64), so the returned
    weights are the sampling probabilities.  A prefix of weight 0 is left out (megatron's
    ``BlendedDataset`` takes positive weights only), and a blend of one prefix has weights
    ``None`` (nothing to blend: megatron builds a plain ``GPTDataset``).

    Raises a one-line ``ValueError`` naming ``key`` for: a non-list or empty list, an
    odd-length weighted list, a weight that is not a finite number, a negative weight, only
    zero weights, a prefix that is not a non-empty string, and a list mixing the two forms.
    """
    from megatron.core.datasets.utils import normalize

    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{key} must be a list, {_FORMS}; got {value!r}")
    items = list(value)
    if not items:
        raise ValueError(f"{key} is an empty list; give {_FORMS}, or leave {key} unset")
    if not any(_is_weight(item) for item in items):  # [prefix, ...]
        for i, item in enumerate(items):
            if isinstance(item, str) and _looks_like_number(item):
                raise ValueError(f"{key}[{i}]={item!r} is a number written as a string; write "
                                 f"weights as numbers: [{item.strip()}, prefix1, ...]")
        return [_check_prefix(item, key, i) for i, item in enumerate(items)], None
    if not _is_weight(items[0]):
        i = next(i for i, item in enumerate(items) if _is_weight(item))
        raise ValueError(f"{key} mixes the two forms: {key}[{i}]={items[i]!r} is a weight in a list "
                         f"that starts with the prefix {items[0]!r}; give every prefix a weight or none: "
                         f"{_FORMS}")
    if len(items) % 2:
        raise ValueError(f"{key} has {len(items)} entries, but a weighted blend alternates weight and "
                         f"prefix ([w1, prefix1, w2, prefix2, ...]), an even number; a weight or a "
                         f"prefix is missing")
    prefixes, weights = [], []
    for i in range(0, len(items), 2):
        weight = items[i]
        if not _is_weight(weight) or not math.isfinite(weight):
            raise ValueError(f"{key}[{i}]={weight!r} is not a number, but it stands where a weight "
                             f"belongs in [w1, prefix1, w2, prefix2, ...]; write the weight as a "
                             f"number, and give every prefix a weight")
        if weight < 0:
            raise ValueError(f"{key}[{i}]={weight} is a negative weight; weights must be >= 0")
        prefix = _check_prefix(items[i + 1], key, i + 1)
        if weight > 0:
            prefixes.append(prefix)
            weights.append(float(weight))
    if not prefixes:
        raise ValueError(f"{key} has only zero weights; give at least one prefix a positive weight")
    if len(prefixes) == 1:
        return prefixes, None
    return prefixes, normalize(weights)


@dataclass(frozen=True)
class DataSources:
    """Where the samples of the three splits come from: either one ``blend`` cut into
    train/valid/test by the ``split`` string (``data.data_path``, or one ``data.data_prefix``),
    or ``blend_per_split``, a blend (or ``None``) per split, each dataset used whole."""

    blend: Optional[Blend] = None
    split: Optional[str] = None
    blend_per_split: Optional[tuple[Optional[Blend], Optional[Blend], Optional[Blend]]] = None

    def __post_init__(self):
        if (self.blend is None) == (self.blend_per_split is None):
            raise ValueError("DataSources takes either blend (with split) or blend_per_split")
        if self.blend is not None and not self.split:
            raise ValueError("DataSources(blend=...) needs the split string, e.g. '90,10,0'")
        if self.blend_per_split is not None:
            if self.split is not None:
                raise ValueError("DataSources(blend_per_split=...) takes no split: each dataset is used whole")
            if len(self.blend_per_split) != 3 or self.blend_per_split[0] is None:
                raise ValueError("DataSources.blend_per_split needs three entries (train, valid, test), "
                                 "the train blend given")

    @property
    def blends(self) -> list[Blend]:
        """The blends given (one, or one per split that has one)."""
        if self.blend is not None:
            return [self.blend]
        return [b for b in self.blend_per_split if b is not None]

    @property
    def prefixes(self) -> list[str]:
        """Every distinct prefix, in order of appearance."""
        return list(dict.fromkeys(p for prefixes, _ in self.blends for p in prefixes))

    def describe(self) -> str:
        """A short description for start-up logs."""

        def one(blend: Blend) -> str:
            prefixes, weights = blend
            if len(prefixes) == 1:
                return prefixes[0]
            shown = [f"{w:.3g} {p}" for p, w in zip(prefixes, weights)] if weights else prefixes
            more = f", ... ({len(prefixes)} datasets)" if len(shown) > 4 else ""
            return "[" + ", ".join(shown[:4]) + more + "]"

        if self.blend is not None:
            return f"{one(self.blend)} split {self.split}"
        return " | ".join(f"{name} {one(b) if b else 'none'}"
                          for name, b in zip(SPLIT_NAMES, self.blend_per_split))


def data_sources_from_config(data_cfg, default_prefix: str) -> DataSources:
    """The run's :class:`DataSources` from the ``data`` config. Precedence: the per-split keys
    (``data.train_data_path`` & co., ``data.split`` unused) > ``data.data_path`` >
    ``data.data_prefix`` > ``default_prefix`` (the prepared corpus). Setting both
    ``data.data_prefix`` and ``data.data_path`` is an error."""
    data_prefix = getattr(data_cfg, "data_prefix", None)
    data_path = getattr(data_cfg, "data_path", None)
    per_split = [getattr(data_cfg, key.split(".")[1], None) for key in PER_SPLIT_KEYS]
    if data_prefix and data_path is not None:
        raise ValueError("data.data_prefix and data.data_path are both set; keep one: "
                         "data.data_prefix=<prefix> for one dataset, data.data_path=[w1, prefix1, ...] "
                         "for a blend")
    if any(v is not None for v in per_split):
        if per_split[0] is None:
            raise ValueError("data.valid_data_path/data.test_data_path are set but data.train_data_path "
                             "is not; set data.train_data_path=[...] too (per-split blends replace "
                             "data.data_path and data.split)")
        if data_prefix or data_path is not None:
            warnings.warn("data.train_data_path (per-split blends) is set: data.data_prefix/data.data_path "
                          "are not used", stacklevel=2)
        return DataSources(blend_per_split=tuple(
            None if v is None else parse_blend(v, key) for v, key in zip(per_split, PER_SPLIT_KEYS)))
    if data_path is not None:
        return DataSources(blend=parse_blend(data_path, "data.data_path"), split=data_cfg.split)
    return DataSources(blend=([data_prefix or default_prefix], None), split=data_cfg.split)


def is_single_prefix(sources) -> bool:
    """True for one indexed dataset cut by ``data.split`` (a prefix string, or a
    :class:`DataSources` whose blend holds one prefix): what per-document labels need."""
    if isinstance(sources, str):
        return True
    return sources.blend is not None and len(sources.blend[0]) == 1


def require_single_prefix(sources, key: str = "data.labels") -> None:
    """One-line ``ValueError`` when ``key`` (per-document labels) is used with a blend."""
    if not is_single_prefix(sources):
        raise ValueError(f"{key} (one label per document) needs a single dataset (data.data_prefix), "
                         f"but the data is a blend: {sources.describe()}; drop {key} or use one prefix")


# --- per-prefix checks, cached ---------------------------------------------------------------

@dataclass(frozen=True)
class PrefixMetadata:
    """What the start-up checks learned about one indexed dataset."""

    sequences: int  # documents, as megatron's GPTDataset counts them (sequence_lengths)
    tokens: int
    max_token_id: int


def _file_key(prefix: str) -> Optional[list[int]]:
    """Sizes and modification times of ``.idx`` and ``.bin`` (None when one is missing)."""
    try:
        idx, bin_ = os.stat(prefix + ".idx"), os.stat(prefix + ".bin")
    except OSError:
        return None
    return [idx.st_size, idx.st_mtime_ns, bin_.st_size, bin_.st_mtime_ns]


def _inspect_prefix(prefix: str) -> dict:
    """Check one prefix's files (raising the one-line error) and scan its token ids."""
    try:
        info = check_indexed_dataset_files(prefix)
    except FileNotFoundError as err:
        hint = "" if not prefix.endswith((".bin", ".idx")) else " (give the prefix, without .bin/.idx)"
        raise ValueError(f"{err}{hint}") from None
    if info["sequences"] == 0 or info["bin_bytes"] == 0:  # (numpy cannot memmap an empty .bin)
        raise ValueError(f"indexed dataset {prefix} is empty (0 documents or 0 tokens); leave it out of "
                         f"the blend or re-create it with tools/preprocess_data.py")
    itemsize = np.dtype(info["dtype"]).itemsize
    return {"sequences": info["sequences"], "tokens": info["bin_bytes"] // itemsize,
            "max_token_id": scan_max_token_id(prefix + ".bin", info["dtype"])}


def _load_metadata_cache(path: str) -> dict:
    try:
        with open(path) as f:
            cached = json.load(f)
        return cached["prefixes"] if isinstance(cached.get("prefixes"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        return {}


def _save_metadata_cache(path: str, entries: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "prefixes": entries}, f)
    os.replace(tmp, path)


def problems_message(problems: list[str]) -> str:
    """One line per problem, at most ``MAX_LISTED_PROBLEMS`` of them, then a count."""
    lines = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > len(lines):
        lines.append(f"... and {len(problems) - len(lines)} more problems of the same kind")
    return "\n".join(lines)


def read_blend_metadata(prefixes: list[str], tokenizer, cache_dir: str) -> dict[str, PrefixMetadata]:
    """Check every prefix (see :func:`validate_blend_prefixes`) and return its metadata."""
    cache_file = os.path.join(cache_dir, METADATA_FILE)
    cached = _load_metadata_cache(cache_file)
    metadata, problems, changed = {}, [], False
    for prefix in dict.fromkeys(prefixes):
        name, key = os.path.abspath(prefix), _file_key(prefix)
        entry = cached.get(name)
        if key is None or not isinstance(entry, dict) or entry.get("key") != key:
            try:
                entry = dict(_inspect_prefix(prefix), key=key)
            except ValueError as err:
                problems.append(" ".join(str(err).split()))
                continue
            cached[name], changed = entry, True
        if entry["max_token_id"] >= tokenizer.vocab_size:
            problems.append(vocabulary_mismatch(prefix, entry["max_token_id"], tokenizer.vocab_size))
            continue
        metadata[prefix] = PrefixMetadata(entry["sequences"], entry["tokens"], entry["max_token_id"])
    if changed:
        _save_metadata_cache(cache_file, cached)
    if problems:
        raise ValueError(problems_message(problems))
    return metadata


def validate_blend_prefixes(prefixes: list[str], tokenizer, cache_dir: str) -> None:
    """Check every prefix of a blend: both files present, the ``.idx`` a megatron index whose
    sizes match the ``.bin`` (:func:`~prosec_mcore.data.datasets.check_indexed_dataset_files`),
    not empty, every token id below ``tokenizer.vocab_size``.  All problems are collected into
    one ``ValueError`` with one line per bad prefix naming its file and the fix.

    The result of a prefix's checks is cached in ``<cache_dir>/indexed_dataset_metadata.json``
    (one file for all prefixes) under the sizes and modification times of its two files, so a
    known blend is re-checked with two ``stat`` calls per prefix (the tokenizer comparison is
    redone each time)."""
    read_blend_metadata(prefixes, tokenizer, cache_dir)


# --- which splits to build -------------------------------------------------------------------

@dataclass
class BlendPlan:
    """What to give megatron-core: ``GPTDatasetConfig(blend=..., blend_per_split=..., split=...)``,
    the builder's ``sizes``, and the splits (of a shared blend) that are not built."""

    blend: Optional[Blend]
    blend_per_split: Optional[list[Optional[Blend]]]
    split: Optional[str]
    sizes: list[Optional[int]]
    not_built: list[int]


def _document_tokens(prefix: str, n_sequences: int, begin: int, end: int, need: int) -> int:
    """Tokens in documents ``begin .. end - 1`` of ``prefix``, counted from the ``.idx`` lengths
    and stopping once ``need`` is reached (a split's first documents usually suffice)."""
    total = 0
    with open(prefix + ".idx", "rb") as f:  # int32 lengths follow the header
        for start in range(begin, min(end, n_sequences), _LENGTH_CHUNK):
            count = min(end, n_sequences, start + _LENGTH_CHUNK) - start
            total += int(np.fromfile(f, dtype=np.int32, count=count,
                                     offset=_IDX_HEADER_BYTES + 4 * start if start == begin else 0).sum())
            if total >= need:
                break
    return total


def _short_split_message(split_index: int, prefix: str, split: Optional[str], n_docs: int,
                         n_split_docs: int, n_tokens: int, seq_length: int, requested: int) -> str:
    """One line for a prefix that gives a split the run reads less than one sample."""
    label = "validation" if split_index == 1 else SPLIT_NAMES[split_index]
    wants = "" if split_index == 0 else f", but validation asks for {requested:,} samples"
    if split is None:  # per-split blends: the whole dataset
        key = PER_SPLIT_KEYS[split_index]
        return (f"{key}: {prefix} holds {n_tokens:,} tokens, fewer than one sample of data.seq_length="
                f"{seq_length}{wants}; leave it out of {key}, use more data or a shorter data.seq_length")
    if n_split_docs == 0:
        what = f"data.split={split} gives the {label} split of {prefix} no documents (of {n_docs})"
    else:
        what = (f"data.split={split} gives the {label} split of {prefix} {n_split_docs} document(s) "
                f"holding {n_tokens:,} tokens, fewer than one sample of data.seq_length={seq_length}")
    share = ("give training a larger share of data.split (e.g. \"data.split='90,10,0'\")" if split_index == 0
             else "give validation a larger share of data.split (e.g. \"data.split='80,20,0'\")")
    off = "" if split_index == 0 else ", or set train.eval_interval=0"
    return f"{what}{wants}; {share}, more documents to that prefix, or leave it out of data.data_path{off}"


def plan_blend_build(sources: DataSources, metadata: dict[str, PrefixMetadata], seq_length: int,
                     num_samples: tuple[int, int, int]) -> BlendPlan:
    """Decide which splits megatron builds, and refuse (one ``ValueError``, one line per prefix)
    a split the run reads (train; valid when ``num_samples[1] > 0``) that gets fewer tokens than
    one sample from some prefix: megatron would loop forever (no tokens) or repeat a few tokens
    to fill its samples.  A split the run does not read is not built (``None``) when a prefix
    gives it no sample (a warning says which), or when its blend is weighted and it is asked for
    no samples (megatron draws a weighted blend only for a given number of samples)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    if sources.blend is not None:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(sources.split))
        blends = [sources.blend if bookends is not None else None for bookends in matrix]
    else:
        matrix = [(0.0, 1.0)] * 3  # each dataset used whole
        blends = list(sources.blend_per_split)
    sizes: list[Optional[int]] = [None, None, None]
    not_built, problems = [], []
    for i, blend in enumerate(blends):
        asked = num_samples[i] > 0
        read = i == 0 or (i == 1 and asked)
        weighted = blend is not None and blend[1] is not None
        if blend is None:
            if read and sources.blend is None:
                problems.append(f"validation asks for {num_samples[1]:,} samples but data.valid_data_path "
                                f"is not set; set it, or set train.eval_interval=0")
            elif read:  # a 0 share of data.split for validation
                problems.append(f"data.split={sources.split} gives validation no documents, but it asks for "
                                f"{num_samples[1]:,} samples; give the validation split documents, e.g. "
                                f"\"data.split='90,10,0'\", or set train.eval_interval=0")
            sizes[i] = 0 if sources.blend is not None and sources.blend[1] is not None else None
            continue
        if weighted and not asked:
            if i == 0:
                raise ValueError("a weighted blend is drawn for a given number of samples: ask for "
                                 "training samples (num_samples[0] > 0)")
            not_built.append(i)
            sizes[i] = 0
            continue
        short = []
        for prefix in dict.fromkeys(blend[0]):
            n_docs = metadata[prefix].sequences
            begin, end = (int(round(matrix[i][0] * n_docs)), int(round(matrix[i][1] * n_docs)))
            n_tokens = _document_tokens(prefix, n_docs, begin, end, seq_length) if end > begin else 0
            if n_tokens < seq_length:
                short.append((prefix, n_docs, max(end - begin, 0), n_tokens))
        if short and read:
            problems += [_short_split_message(i, p, sources.split, n, k, t, seq_length, num_samples[i])
                         for p, n, k, t in short]
        elif short:
            warnings.warn(f"the {SPLIT_NAMES[i]} split is not built (None): {', '.join(s[0] for s in short)} "
                          f"give(s) it fewer tokens than one sample of {seq_length}", stacklevel=3)
            not_built.append(i)
            sizes[i] = 0 if weighted else None
            continue
        sizes[i] = num_samples[i] if asked else None
    if problems:
        raise ValueError(problems_message(problems))
    if sources.blend is not None:
        return BlendPlan(sources.blend, None, sources.split, sizes, not_built)
    per_split = [None if i in not_built else b for i, b in enumerate(blends)]
    return BlendPlan(None, per_split, None, sizes, [])
