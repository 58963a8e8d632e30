"""Tokenized webdataset shards: the writer, the manifest and the start-up checks.

A *shard set* is a directory holding ``manifest.json`` and tar files written with
``webdataset.TarWriter``, named ``{split}-{n:06d}.tar``. Each sample of a tar is

* ``__key__``: ``f"{corpus_index:010d}"``, the sample's index in its split (0-based);
* ``tokens.npy``: a 1-D numpy array of exactly ``seq_length`` token ids (``uint16`` when the
  vocabulary has at most 65536 ids, else ``int32``).

Packing follows megatron's indexed path: the documents (token lists that already end with the
end-of-document id) are split into train/valid/test by *contiguous document ranges* from a split
string such as ``"90,10,0"`` (shares normalised, the bookends rounded to whole documents, as
megatron-core's builder does); each split's documents are concatenated and cut into samples of
``seq_length`` tokens; a trailing partial sample is dropped. Unlike ``GPTDataset`` nothing is
shuffled here: the reader (data/shard_dataset.py) permutes shards and samples per epoch.

A shard closes at ``samples_per_shard`` samples or before it would pass ``shard_bytes`` bytes,
whichever comes first. Every sample costs the same number of tar bytes, so the cut is exact.

``manifest.json`` (written atomically, after every shard is complete)::

    {"format": "prosec-mcore-shards", "version": 1, "seq_length": 128, "dtype": "uint16",
     "vocab_size": 4096, "eod_id": 0, "tokenizer": "<what the user passed>",
     "fields": ["tokens.npy"],
     "splits": {"train": [{"name": "train-000000.tar", "samples": 1000, "bytes": ..,
                           "sha256": ".."}, ...], "valid": [...], "test": [...]}}

Shards are read from the manifest's directory, or from ``shard_url``, a template holding
``{shard}`` (``"/mnt/data/{shard}"``, ``"pipe:curl -s https://host/data/{shard}"``).
:func:`check_shards` checks local shards (present, of the manifest's size) before training
starts, so a missing or truncated copy is named at once instead of hours into a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np

MANIFEST_FORMAT = "prosec-mcore-shards"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
FIELD = "tokens.npy"
SPLITS = ("train", "valid", "test")
WRITE_HINT = "write shards with `python tools/preprocess_data.py --output-format webdataset`"
_REQUIRED = ("format", "version", "seq_length", "dtype", "vocab_size", "eod_id", "tokenizer", "fields",
             "splits")
_SHARD_KEYS = ("name", "samples", "bytes", "sha256")
_TAR_BLOCK, _TAR_RECORD = 512, 10240  # tarfile's block and record sizes (stream mode "w|")


def shard_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id of the vocabulary fits (at most 65536 ids), else ``int32``."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.int32)


def shard_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


def sample_key(corpus_index: int) -> str:
    return f"{corpus_index:010d}"


def tokenized_documents(docs: Iterable[str], tokenizer, batch_size: int = 64) -> Iterable[list[int]]:
    """Each non-blank document's token ids followed by ``tokenizer.eod``, exactly as
    ``preprocess_documents`` tokenizes them (data/preprocess.py's ``tokenize_documents``)."""
    from .preprocess import tokenize_documents

    for _, tokenized in tokenize_documents(docs, tokenizer, batch_size):
        yield from tokenized


def check_split(split: str) -> str:
    """``split`` must be one to three non-negative shares (``"90,10,0"``; missing ones are 0) with
    a positive sum; megatron's own parser would read ``"-5,1"`` as ``"5,1"``."""
    number = r"\s*[0-9]+(?:\.[0-9]*)?\s*"
    if not isinstance(split, str) or not re.fullmatch(f"{number}(?:[,/]{number}){{0,2}}", split) \
            or not sum(float(x) for x in re.split("[,/]", split)) > 0:
        raise ValueError(f"split {split!r} is not up to three non-negative shares with a positive sum, "
                         f"like '90,10,0'")
    return split


def split_document_ranges(split: str, n_docs: int) -> list[tuple[int, int]]:
    """``[(begin, end)]`` document ranges of train, valid and test for ``n_docs`` documents,
    with megatron-core's parsing (``parse_and_normalize_split``) and rounding."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    shares = parse_and_normalize_split(check_split(split))
    ranges = []
    for bookends in convert_split_vector_to_split_matrix(shares):
        if bookends is None:
            ranges.append((0, 0))
        else:
            ranges.append((int(round(bookends[0] * n_docs)), int(round(bookends[1] * n_docs))))
    return ranges


def tar_bytes(samples: int, sample_bytes: int) -> int:
    """Size of a tar of ``samples`` members of ``sample_bytes`` each, as tarfile writes it: a
    512-byte header per member, data padded to 512, two zero blocks, padded to 10240."""
    members = samples * (_TAR_BLOCK + -(-sample_bytes // _TAR_BLOCK) * _TAR_BLOCK)
    return -(-(members + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def samples_per_tar(samples_per_shard: Optional[int], shard_bytes: Optional[int], sample_bytes: int) -> int:
    """The most samples a shard holds under both limits (at least one)."""
    if samples_per_shard is None and shard_bytes is None:
        raise ValueError("give samples_per_shard or shard_bytes (or both)")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    cap = samples_per_shard if samples_per_shard is not None else None
    if shard_bytes is not None:
        per = _TAR_BLOCK + -(-sample_bytes // _TAR_BLOCK) * _TAR_BLOCK
        fit = max(1, (shard_bytes - 2 * _TAR_BLOCK) // per)  # the record padding only rounds up
        while fit > 1 and tar_bytes(fit, sample_bytes) > shard_bytes:
            fit -= 1
        cap = fit if cap is None else min(cap, fit)
    return cap


class _HashingFile:
    """A write-only file that also feeds a sha256 and counts bytes (the tar is hashed as written)."""

    def __init__(self, path: str):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()


def _write_tar(path: str, rows: np.ndarray, first_index: int) -> dict:
    import webdataset as wds

    tmp = f"{path}.tmp{os.getpid()}"
    out = _HashingFile(tmp)
    try:
        writer = wds.TarWriter(out, mtime=0)  # a fixed mtime: the same data gives the same bytes
        for r, row in enumerate(rows):
            writer.write({"__key__": sample_key(first_index + r), FIELD: row})
        writer.close()
        out.close()
        os.replace(tmp, path)
    except BaseException:
        out.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"name": os.path.basename(path), "samples": int(len(rows)), "bytes": out.bytes,
            "sha256": out.sha256.hexdigest()}


def _spool_documents(documents: Iterable[Sequence[int]], path: str, dtype: np.dtype, vocab_size: int,
                     eod_id: int) -> np.ndarray:
    """Write every document's tokens back to back into ``path``; return the document offsets
    ``[n_docs + 1]``. The split needs the document count, and ``documents`` may be a stream."""
    offsets = [0]
    with open(path, "wb") as f:
        for d, doc in enumerate(documents):
            arr = np.asarray(doc, dtype=np.int64)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"document {d} is not a non-empty list of token ids")
            if arr[-1] != eod_id:
                raise ValueError(f"document {d} does not end with the end-of-document id {eod_id} "
                                 f"(it ends with {int(arr[-1])}); append the tokenizer's eod to every document")
            low, high = int(arr.min()), int(arr.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"document {d} holds token id {high if high >= vocab_size else low}, outside "
                                 f"[0, vocab_size={vocab_size})")
            arr.astype(dtype).tofile(f)
            offsets.append(offsets[-1] + arr.size)
    return np.asarray(offsets, dtype=np.int64)


def write_shards(documents: Iterable[Sequence[int]], out_dir: str, seq_length: int, split: str, vocab_size: int,
                 eod_id: int, samples_per_shard: Optional[int] = None, shard_bytes: Optional[int] = None,
                 tokenizer: str = "") -> dict:
    """Pack ``documents`` (token id lists, each ending with ``eod_id``) into a shard set in
    ``out_dir`` (see the module docs) and return its manifest. Prints nothing.

    The train split must give at least one sample (one-line ValueError otherwise); valid and
    test may be empty (``[]``). Shards are renamed into place when complete and the manifest is
    written last, atomically, so an interrupted run never leaves a set that looks complete.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if not 0 <= eod_id < vocab_size:
        raise ValueError(f"eod_id {eod_id} is outside [0, vocab_size={vocab_size})")
    import webdataset as wds

    dtype = shard_dtype(vocab_size)
    sample_bytes = len(wds.writer.numpy_dumps(np.zeros(seq_length, dtype=dtype)))
    per_shard = samples_per_tar(samples_per_shard, shard_bytes, sample_bytes)
    os.makedirs(out_dir, exist_ok=True)
    spool = os.path.join(out_dir, f".documents.tmp{os.getpid()}")
    try:
        offsets = _spool_documents(documents, spool, dtype, vocab_size, eod_id)
        n_docs = len(offsets) - 1
        if n_docs == 0:
            raise ValueError("no documents were given; nothing was written")
        ranges = split_document_ranges(split, n_docs)
        tokens = np.memmap(spool, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
        splits = {}
        for name, (beg, end) in zip(SPLITS, ranges):
            stream = tokens[offsets[beg]:offsets[max(beg, end)]]
            n_samples = len(stream) // seq_length
            if name == "train" and n_samples == 0:
                raise ValueError(f"split {split!r} gives the train split {end - beg} of {n_docs} documents holding "
                                 f"{len(stream):,} tokens, fewer than one sample of seq_length={seq_length}; use "
                                 f"more data, a larger first share or a shorter seq_length")
            samples = np.asarray(stream[:n_samples * seq_length]).reshape(n_samples, seq_length)
            splits[name] = [_write_tar(os.path.join(out_dir, shard_name(name, n)), samples[first:first + per_shard],
                                       first)
                            for n, first in enumerate(range(0, n_samples, per_shard))]
        del tokens
    finally:
        if os.path.exists(spool):
            os.remove(spool)
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "seq_length": int(seq_length),
                "dtype": dtype.name, "vocab_size": int(vocab_size), "eod_id": int(eod_id), "tokenizer": str(tokenizer),
                "fields": [FIELD], "splits": splits}
    path = os.path.join(out_dir, MANIFEST_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, path)
    return manifest


# --- reading the manifest and finding the shards ------------------------------------------------

def is_url(path: str) -> bool:
    """A ``scheme:...`` address (``pipe:``, ``https://``, ``s3://`` ...) rather than a local path."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", path)) and not path.startswith("file:")


def local_path(url: str) -> Optional[str]:
    """The file a local address names (``/x``, ``x``, ``file:x``, ``file:///x``), or None."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("file:"):
        return url[len("file:"):]
    return None if is_url(url) else url


def manifest_file(path_or_url: str) -> str:
    """A shard set's directory means its manifest.json."""
    local = local_path(path_or_url)
    if local is not None and os.path.isdir(local):
        return os.path.join(local, MANIFEST_NAME)
    return path_or_url


def load_manifest(path_or_url: str) -> tuple[dict, bytes]:
    """The checked manifest and its bytes (:func:`read_manifest`)."""
    path = manifest_file(path_or_url)
    local = local_path(path)
    if local is not None:
        if not os.path.isfile(local):
            raise FileNotFoundError(f"shard manifest {path} not found; {WRITE_HINT}")
        with open(local, "rb") as f:
            raw = f.read()
    else:
        from webdataset.gopen import gopen

        try:
            with gopen(path, "rb") as f:
                raw = f.read()
        except Exception as err:  # noqa: BLE001 - any transport error is about the address the user gave
            raise ValueError(f"cannot read the shard manifest {path} ({_one_line(err)})") from None
        if not raw:
            raise ValueError(f"shard manifest {path} is empty (a wrong address?)")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"shard manifest {path} is not JSON ({_one_line(err)}); {WRITE_HINT}") from None
    return _checked_manifest(manifest, path), raw


def read_manifest(path_or_url: str) -> dict:
    """The manifest at a local path (a shard set's directory means its ``manifest.json``) or any
    address webdataset's ``gopen`` opens, checked: format, version, every key, every shard entry.
    A bad one is a one-line ValueError naming the file and the key."""
    return load_manifest(path_or_url)[0]


def _checked_manifest(manifest, path: str) -> dict:
    def bad(what: str) -> ValueError:
        return ValueError(f"shard manifest {path}: {what}; {WRITE_HINT}")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise bad(f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise bad(f"version is {manifest.get('version')!r}, this reader knows {MANIFEST_VERSION}")
    for key in _REQUIRED:
        if key not in manifest:
            raise bad(f"no key {key!r}")
    for key in ("seq_length", "vocab_size", "eod_id"):
        if not isinstance(manifest[key], int) or manifest[key] < (0 if key == "eod_id" else 1):
            raise bad(f"{key!r} is {manifest[key]!r}, not a positive integer")
    if manifest["dtype"] not in ("uint16", "int32"):
        raise bad(f"'dtype' is {manifest['dtype']!r}, expected 'uint16' or 'int32'")
    if manifest["fields"] != [FIELD]:
        raise bad(f"'fields' is {manifest['fields']!r}, expected {[FIELD]!r}")
    splits = manifest["splits"]
    if not isinstance(splits, dict):
        raise bad("'splits' is not an object")
    for split in SPLITS:
        if split not in splits:
            raise bad(f"no key 'splits.{split}'")
        if not isinstance(splits[split], list):
            raise bad(f"'splits.{split}' is not a list")
        for n, entry in enumerate(splits[split]):
            for key in _SHARD_KEYS:
                if not isinstance(entry, dict) or key not in entry:
                    raise bad(f"no key 'splits.{split}[{n}].{key}'")
            if not isinstance(entry["samples"], int) or entry["samples"] < 1:
                raise bad(f"'splits.{split}[{n}].samples' is {entry['samples']!r}, not a positive integer")
    return manifest


def shard_urls(manifest: dict, manifest_path: str, split: str, shard_url: Optional[str] = None) -> list[str]:
    """Where each shard of ``split`` is read: ``shard_url`` with ``{shard}`` replaced by the shard's
    name, or (None) the manifest's directory (a local folder, or an ``http(s)://``-style address)."""
    names = [entry["name"] for entry in manifest["splits"][split]]
    if shard_url is not None:
        if "{shard}" not in shard_url:
            raise ValueError(f"data.shard_url={shard_url!r} has no {{shard}} placeholder, e.g. "
                             f"'/mnt/data/{{shard}}' or 'pipe:curl -s https://host/data/{{shard}}'")
        return [shard_url.replace("{shard}", name) for name in names]
    path = manifest_file(manifest_path)
    local = local_path(path)
    if local is not None:
        return [os.path.join(os.path.dirname(local), name) for name in names]
    if path.startswith("pipe:") or "/" not in path.split(":", 1)[1]:
        raise ValueError(f"cannot tell where the shards of {path} are; give data.shard_url, a template "
                         f"with {{shard}} such as 'pipe:curl -s https://host/data/{{shard}}'")
    return [path.rsplit("/", 1)[0] + "/" + name for name in names]


def check_shards(manifest: dict, manifest_path: str, split: str, shard_url: Optional[str] = None) -> list[str]:
    """The shard URLs of ``split`` (:func:`shard_urls`), after checking that every local shard
    exists and has the manifest's byte size. All bad shards are named in one ValueError, one
    line each (remote shards are checked when read: size and sha256)."""
    urls = shard_urls(manifest, manifest_path, split, shard_url)
    problems = []
    for url, entry in zip(urls, manifest["splits"][split]):
        local = local_path(url)
        if local is None:
            continue
        if not os.path.isfile(local):
            problems.append(f"shard {local} is missing (listed in {manifest_path})")
        elif os.path.getsize(local) != entry["bytes"]:
            problems.append(f"shard {local} holds {os.path.getsize(local):,} bytes but {manifest_path} says "
                            f"{entry['bytes']:,} (truncated or foreign copy?); re-copy it")
    if problems:
        raise ValueError("\n".join(problems))
    return urls


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
