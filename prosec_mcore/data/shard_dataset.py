"""Endless, exactly resumable sample streams over tokenized tar shards (data/shards.py).

A :class:`ShardDataset` answers ``source[i] -> {"tokens": LongTensor [L], "corpus_index": int}``
for every global sample index ``i >= 0`` (``endless = True``: data/batches.py never wraps it).
Which sample ``i`` is depends only on ``(seed, i)``, never on what was read before, so a run
resumed at any iteration sees exactly the samples an uninterrupted run would have seen.

Streams
-------
The ``G = global_batch_size`` positions of a global batch are cut into ``V = streams`` equal,
contiguous parts; part ``v`` is stream ``v``. Global index ``i`` is batch ``k = i // G``,
position ``j = i % G``, hence::

    stream v = j // (G/V)        stream position q = k * (G/V) + j % (G/V)

Data-parallel rank ``r`` of ``D`` owns positions ``r*G/D .. (r+1)*G/D - 1``; with ``V`` a multiple
of ``D`` those are exactly streams ``r*V/D .. (r+1)*V/D - 1``, so each rank reads only its own
streams' shards, and the batches do not depend on ``D``.

Epochs
------
In epoch ``e`` the ``S`` shards are permuted by ``numpy.random.default_rng([seed, e,
SHARD_ORDER_KEY]).permutation(S)`` and stream ``v`` takes ``perm[v::V]`` (so ``S >= V``). A stream
reads its shards of epoch 0 one after the other, then its shards of epoch 1, and so on; inside a
shard ``s`` it visits the samples in the order ``default_rng([seed, e, s]).permutation(n_s)``.
Stream position ``q`` therefore maps to (epoch, shard, offset) by cumulative sample counts, and
every epoch visits each sample of a stream's share exactly once.

Reading
-------
A shard is read whole with the webdataset library (its tar iteration, no shuffling), checked
(byte size and sha256 from the manifest, a ``tokens.npy`` of ``seq_length`` ids in every sample,
the keys, the sample count) and kept decoded as an ``[n, L]`` array in a small per-process LRU
cache. When a stream reaches the second half of a shard, its next shard is decoded ahead in a
background thread. ``decoder="dali"`` decodes with NVIDIA DALI instead (data/dali_decode.py).

Blends
------
:class:`ShardBlend` mixes shard sets with weights inside each stream: stream position ``q`` comes
from source ``d`` by megatron-core's blending rule (``build_blending_indices``) over blocks of
``BLEND_BLOCK`` positions, at that source's stream position "how many of stream ``v``'s
positions before ``q`` went to ``d``". A blend thus keeps the property that each rank reads only
its own streams. :func:`build_shard_source` builds either from ``data.shards``.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from .shards import (
    FIELD,
    SPLITS,
    WRITE_HINT,
    check_shards,
    load_manifest,
    local_path,
    manifest_file,
    sample_key,
)

SHARD_ORDER_KEY = 0x5348415244  # "SHARD": the seed word of the shard order, never a shard index
BLEND_BLOCK = 4096  # positions per block of a blend's source pattern
DECODERS = ("webdataset", "dali")
_LAYOUT_CACHE = 8  # epochs whose shard layout is kept


class ShardDataset:
    """One split of one shard set as an endless stream source (see the module docs).

    ``manifest``: a manifest path or address (or a shard set's directory); ``shard_url``: a
    template with ``{shard}`` for where the shards are read (None: beside the manifest);
    ``cache_shards``: decoded shards kept per process (None: two per stream).

    Start-up checks, one line each: the manifest, its ``seq_length`` (must equal ``seq_length``)
    and ``vocab_size`` (must not exceed the tokenizer's), a split with fewer shards than streams,
    local shards missing or of the wrong size, and ``decoder="dali"`` with remote shards or
    without DALI installed.
    """

    endless = True

    def __init__(self, manifest: str, split: str, seq_length: int, seed: int, global_batch_size: int, streams: int,
                 tokenizer_vocab_size: int, shard_url: Optional[str] = None, decoder: str = "webdataset",
                 cache_shards: Optional[int] = None):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if streams < 1 or global_batch_size < 1 or global_batch_size % streams:
            raise ValueError(f"data.streams={streams} must divide train.global_batch_size={global_batch_size}: "
                             f"every stream takes the same share of each global batch")
        if seed < 0:
            raise ValueError(f"train.seed={seed} must be >= 0 for shard streams")
        self.manifest_path = manifest_file(manifest)
        self.manifest, raw = load_manifest(manifest)
        self.manifest_sha256 = hashlib.sha256(raw).hexdigest()
        m, where = self.manifest, self.manifest_path
        if m["seq_length"] != seq_length:
            raise ValueError(f"data.seq_length={seq_length} but the shards of {where} hold samples of "
                             f"{m['seq_length']} tokens; set data.seq_length={m['seq_length']} or re-write the "
                             f"shards with --seq-length {seq_length}")
        if m["vocab_size"] > tokenizer_vocab_size:
            raise ValueError(f"{where} was written with a vocabulary of {m['vocab_size']} ids, more than the "
                             f"tokenizer's {tokenizer_vocab_size} (tokenizer {m['tokenizer']!r}); use the tokenizer "
                             f"the shards were written with")
        self.entries = m["splits"][split]
        if not self.entries:
            raise ValueError(f"the {split} split of {where} has no shards (a 0 {split} share in --split, or too "
                             f"few documents); re-write the shards with a {split} share"
                             + (", or set train.eval_interval=0" if split == "valid" else ""))
        if len(self.entries) < streams:
            raise ValueError(f"the {split} split of {where} has {len(self.entries)} shard(s), fewer than "
                             f"data.streams={streams}; write smaller shards (--samples-per-shard / --shard-bytes) "
                             f"or lower data.streams")
        self.urls = check_shards(m, where, split, shard_url)
        if decoder == "dali":
            remote = [u for u in self.urls if local_path(u) is None]
            if remote:
                raise ValueError(f"data.loader=dali reads local files only, but shard {remote[0]} is remote; "
                                 f"copy the shards to a local disk (data.shard_url) or use data.loader=webdataset")
            from .dali_decode import require_dali

            require_dali()
        self.split, self.seq_length, self.seed, self.decoder = split, seq_length, seed, decoder
        self.global_batch_size, self.streams = global_batch_size, streams
        self.per_stream = global_batch_size // streams
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.names = [entry["name"] for entry in self.entries]
        self.counts = np.asarray([entry["samples"] for entry in self.entries], dtype=np.int64)
        self.first_index = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.cache_shards = cache_shards if cache_shards is not None else 2 * streams
        if self.cache_shards < 1:
            raise ValueError(f"cache_shards must be >= 1, got {cache_shards}")
        self.shard_reads: collections.Counter = collections.Counter()  # shard name -> times decoded
        self._init_process_state()

    # --- per-process state (dropped when pickled for a worker process) -----------------------
    def _init_process_state(self) -> None:
        self._lock = threading.RLock()
        self._epoch_starts = [[0] for _ in range(self.streams)]  # stream v: the position epoch e starts at
        self._layouts: collections.OrderedDict = collections.OrderedDict()
        self._orders: collections.OrderedDict = collections.OrderedDict()
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._pending: dict[int, Future] = {}
        self._pool: Optional[ThreadPoolExecutor] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_lock", "_epoch_starts", "_layouts", "_orders", "_cache", "_pending", "_pool"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_process_state()

    # --- the order: a pure function of (seed, i) ---------------------------------------------
    def stream_of(self, i: int) -> tuple[int, int]:
        """``(stream v, stream position q)`` of global sample index ``i``."""
        if i < 0:
            raise IndexError(f"sample index {i} < 0")
        k, j = divmod(int(i), self.global_batch_size)
        v, r = divmod(j, self.per_stream)
        return v, k * self.per_stream + r

    def epoch_layout(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per stream: its shards in ``epoch`` (indices into the split) and their cumulative
        sample counts (starting at 0)."""
        with self._lock:
            layout = self._layouts.get(epoch)
            if layout is None:
                perm = np.random.default_rng([self.seed, epoch, SHARD_ORDER_KEY]).permutation(len(self.counts))
                layout = []
                for v in range(self.streams):
                    shards = perm[v::self.streams]
                    layout.append((shards, np.concatenate([[0], np.cumsum(self.counts[shards])])))
                self._layouts[epoch] = layout
                while len(self._layouts) > _LAYOUT_CACHE:
                    self._layouts.popitem(last=False)
            else:
                self._layouts.move_to_end(epoch)
            return layout

    def visit_order(self, epoch: int, shard: int) -> np.ndarray:
        """The order in which ``epoch`` visits the samples of ``shard`` (rows in tar order)."""
        key = (epoch, shard)
        with self._lock:
            order = self._orders.get(key)
            if order is None:
                order = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.counts[shard]))
                self._orders[key] = order
                while len(self._orders) > 4 * self.streams + 4:
                    self._orders.popitem(last=False)
            return order

    def locate(self, v: int, q: int) -> tuple[int, int, int, int]:
        """Stream ``v``'s position ``q`` as ``(epoch, t, shard, offset)``: the ``t``-th shard of the
        stream in that epoch, ``shard`` its index in the split, ``offset`` how many of its samples
        the stream visited before."""
        with self._lock:
            starts = self._epoch_starts[v]
            while starts[-1] <= q:
                _, cum = self.epoch_layout(len(starts) - 1)[v]
                starts.append(starts[-1] + int(cum[-1]))
            epoch = bisect.bisect_right(starts, q) - 1
            shards, cum = self.epoch_layout(epoch)[v]
        local = q - starts[epoch]
        t = int(np.searchsorted(cum, local, side="right")) - 1
        return epoch, t, int(shards[t]), int(local - cum[t])

    def _next_shard(self, v: int, epoch: int, t: int) -> int:
        shards, _ = self.epoch_layout(epoch)[v]
        return int(shards[t + 1]) if t + 1 < len(shards) else int(self.epoch_layout(epoch + 1)[v][0][0])

    # --- samples -----------------------------------------------------------------------------
    def sample_at(self, v: int, q: int) -> dict:
        """The sample at stream ``v``'s position ``q``."""
        epoch, t, shard, offset = self.locate(v, q)
        row = int(self.visit_order(epoch, shard)[offset])
        tokens = self._shard(shard)
        if 2 * offset >= self.counts[shard]:
            self._prefetch(self._next_shard(v, epoch, t))
        return {"tokens": torch.from_numpy(tokens[row].astype(np.int64)),
                "corpus_index": int(self.first_index[shard] + row)}

    def __getitem__(self, i: int) -> dict:
        return self.sample_at(*self.stream_of(i))

    def position_in_stream(self, v: int, q: int) -> dict:
        epoch, _, shard, offset = self.locate(v, q)
        row = int(self.visit_order(epoch, shard)[offset])
        return {"stream": v, "stream_position": q, "epoch": epoch, "shard": self.names[shard], "offset": offset,
                "corpus_index": int(self.first_index[shard] + row)}

    def position(self, i: int) -> dict:
        """Where sample ``i`` is read: stream, stream position, epoch, shard name, offset (samples
        of that shard the stream visited before) and the sample's corpus index. JSON-ready."""
        return self.position_in_stream(*self.stream_of(i))

    def fingerprint(self) -> dict:
        """What must be equal for an exact resume: the manifest's bytes, split, streams, seed and
        global batch size (where the shards are read from, and the decoder, may change)."""
        return {"manifest_sha256": self.manifest_sha256, "split": self.split, "streams": self.streams,
                "seed": self.seed, "global_batch_size": self.global_batch_size}

    @property
    def samples_per_epoch(self) -> int:
        return int(self.counts.sum())

    def __repr__(self) -> str:
        return (f"ShardDataset({self.manifest_path}, {self.split}: {len(self.names)} shards, "
                f"{self.samples_per_epoch} samples of {self.seq_length}, {self.streams} streams, {self.decoder})")

    # --- the decoded-shard cache and the prefetch thread --------------------------------------
    def _shard(self, shard: int) -> np.ndarray:
        with self._lock:
            tokens = self._cache.get(shard)
            if tokens is not None:
                self._cache.move_to_end(shard)
                return tokens
            future = self._pending.get(shard)
        try:
            tokens = future.result() if future is not None else self._decode(shard)
        finally:
            if future is not None:
                with self._lock:
                    self._pending.pop(shard, None)
        with self._lock:
            self._cache[shard] = tokens
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return tokens

    def _prefetch(self, shard: int) -> None:
        with self._lock:
            if shard in self._cache or shard in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-prefetch")
            self._pending[shard] = self._pool.submit(self._decode, shard)

    def _decode(self, shard: int) -> np.ndarray:
        url, entry = self.urls[shard], self.entries[shard]
        with self._lock:
            self.shard_reads[entry["name"]] += 1
        if self.decoder == "dali":
            from .dali_decode import decode_shard_dali

            path = local_path(url)
            with open(path, "rb") as f:
                check_shard_bytes(url, entry, self.manifest_path, hashlib.file_digest(f, "sha256"),
                                  f.seek(0, io.SEEK_END))
            tokens = decode_shard_dali(path, self.seq_length, entry["samples"])
        else:
            tokens = read_shard(url, entry, self.manifest_path, self.seq_length, int(self.first_index[shard]))
        if tokens.size and int(tokens.max()) >= self.tokenizer_vocab_size:
            raise ValueError(f"shard {url} holds token id {int(tokens.max())}, beyond the tokenizer's vocab_size "
                             f"{self.tokenizer_vocab_size}; use the tokenizer the shards were written with")
        return tokens


def check_shard_bytes(url: str, entry: dict, manifest_path: str, sha256, size: int) -> None:
    """A shard's bytes must be the ones the manifest recorded (size, then sha256)."""
    if size != entry["bytes"]:
        raise ValueError(f"shard {url} holds {size:,} bytes but {manifest_path} says {entry['bytes']:,} "
                         f"(truncated or foreign copy?); re-copy it")
    if sha256.hexdigest() != entry["sha256"]:
        raise ValueError(f"shard {url} has sha256 {sha256.hexdigest()[:16]}... but {manifest_path} says "
                         f"{entry['sha256'][:16]}... (corrupt or foreign copy?); re-copy it")


def read_shard(url: str, entry: dict, manifest_path: str, seq_length: int, first_index: int) -> np.ndarray:
    """Every sample of one shard, in tar order, as an array ``[n, seq_length]`` of its stored
    dtype: the bytes are fetched with webdataset's ``gopen`` (any address it opens), checked
    against the manifest (size, sha256) and iterated with webdataset's tar iteration. Keys must
    be the corpus indices ``first_index, first_index + 1, ...`` and every sample needs a
    ``tokens.npy`` of ``seq_length`` ids; anything else is a one-line ValueError naming the
    shard and the key."""
    try:
        import webdataset as wds
    except ImportError:
        raise ValueError("data.loader=webdataset needs the webdataset library: pip install webdataset") from None
    try:
        stream = wds.gopen(url, "rb")
        try:
            data = stream.read()
        finally:
            stream.close()
    except Exception as err:  # noqa: BLE001 - a transport error is about the address
        raise ValueError(f"cannot read the shard {url} ({_reason(err)}); check data.shard_url") from None
    check_shard_bytes(url, entry, manifest_path, hashlib.sha256(data), len(data))
    rows, n = [], entry["samples"]
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
        for r, sample in enumerate(wds.tariterators.group_by_keys(files)):
            key = sample["__key__"]
            if key != sample_key(first_index + r):
                raise ValueError(f"shard {url}: sample {r} has key {key!r}, expected "
                                 f"{sample_key(first_index + r)!r} (shards of another set?); {WRITE_HINT}")
            if FIELD not in sample:
                fields = sorted(k for k in sample if not k.startswith("__"))
                raise ValueError(f"shard {url}: sample {key} has no {FIELD} (fields: {fields}); {WRITE_HINT}")
            row = np.lib.format.read_array(io.BytesIO(sample[FIELD]), allow_pickle=False)
            if row.shape != (seq_length,) or row.dtype.kind not in "iu":
                raise ValueError(f"shard {url}: sample {key} holds {row.dtype} tokens of shape {row.shape}, expected "
                                 f"{seq_length} integer ids; {WRITE_HINT}")
            rows.append(row)
    except ValueError as err:
        if str(err).startswith(f"shard {url}"):
            raise
        raise ValueError(f"shard {url} is not a readable tar of samples ({_reason(err)}); re-copy it") from None
    except Exception as err:  # noqa: BLE001 - tarfile's and numpy's errors about the bytes
        raise ValueError(f"shard {url} is not a readable tar of samples ({_reason(err)}); re-copy it") from None
    if len(rows) != n:
        raise ValueError(f"shard {url} holds {len(rows)} samples but {manifest_path} says {n}; re-copy it")
    return np.stack(rows)


def _reason(err: BaseException) -> str:
    first = err.args[0] if err.args else err  # webdataset appends the stream and url to args
    lines = [line.strip() for line in str(first).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class ShardBlend:
    """A weighted blend of shard streams, stream by stream (see the module docs). ``sources`` are
    ``[(weight, ShardDataset), ...]`` with equal streams and global batch size; weights are
    normalised as megatron does. Same interface as :class:`ShardDataset`; a sample also carries
    ``"source"`` (its index in ``sources``)."""

    endless = True

    def __init__(self, sources: list, block: int = BLEND_BLOCK):
        from megatron.core.datasets.helpers_cpp import build_blending_indices
        from megatron.core.datasets.utils import normalize

        if not sources:
            raise ValueError("a shard blend needs at least one source")
        first = sources[0][1]
        for _, src in sources:
            if (src.streams, src.global_batch_size) != (first.streams, first.global_batch_size):
                raise ValueError("every source of a shard blend needs the same streams and global batch size")
        weights = [float(w) for w, _ in sources]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"shard blend weights {weights} must be >= 0 with a positive sum")
        self.sources = [src for _, src in sources]
        self.weights = normalize(weights)
        self.block = block
        self.streams, self.global_batch_size = first.streams, first.global_batch_size
        self.dataset_index = np.zeros(block, dtype=np.int16)
        self.dataset_sample_index = np.zeros(block, dtype=np.int64)
        build_blending_indices(self.dataset_index, self.dataset_sample_index,
                               np.asarray(self.weights, dtype=np.float64), len(self.sources), block, False)
        self.per_block = np.bincount(self.dataset_index, minlength=len(self.sources)).astype(np.int64)

    def stream_of(self, i: int) -> tuple[int, int]:
        return self.sources[0].stream_of(i)

    def source_of(self, q: int) -> tuple[int, int]:
        """``(source d, d's stream position)`` of a stream position ``q`` (the same in every stream)."""
        b, r = divmod(int(q), self.block)
        d = int(self.dataset_index[r])
        return d, int(b * self.per_block[d] + self.dataset_sample_index[r])

    def __getitem__(self, i: int) -> dict:
        v, q = self.stream_of(i)
        d, local = self.source_of(q)
        return {**self.sources[d].sample_at(v, local), "source": d}

    def position(self, i: int) -> dict:
        v, q = self.stream_of(i)
        d, local = self.source_of(q)
        return {**self.sources[d].position_in_stream(v, local), "stream_position": q, "source": d,
                "source_position": local}

    def fingerprint(self) -> dict:
        fps = [src.fingerprint() for src in self.sources]
        return {"manifest_sha256": [fp["manifest_sha256"] for fp in fps], "weights": self.weights,
                "blend_block": self.block, "split": fps[0]["split"], "streams": self.streams,
                "seed": fps[0]["seed"], "global_batch_size": self.global_batch_size}

    @property
    def shard_reads(self) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for d, src in enumerate(self.sources):
            total.update({f"{d}:{name}": n for name, n in src.shard_reads.items()})
        return total

    def __repr__(self) -> str:
        parts = ", ".join(f"{w:.3g} x {src!r}" for w, src in zip(self.weights, self.sources))
        return f"ShardBlend({parts})"


def parse_shard_blend(shards) -> list[tuple[float, str]]:
    """``data.shards`` as ``[(weight, manifest)]``: ``[manifest]`` (weight 1) or ``[w1, manifest1, w2,
    manifest2, ...]`` (Megatron's data_path convention); anything else is a one-line ValueError
    naming ``data.shards``."""
    form = "[manifest] or [w1, manifest1, w2, manifest2, ...]"
    if isinstance(shards, str):
        raise ValueError(f"data.shards={shards!r} must be a list, {form}, e.g. data.shards=[{shards}]")
    shards = list(shards or [])
    if not shards:
        raise ValueError(f"data.shards must be a non-empty list, {form}")
    if len(shards) == 1:
        pairs = [(1.0, shards[0])]
    elif len(shards) % 2:
        raise ValueError(f"data.shards has {len(shards)} entries, an odd number: give {form} (a weight before "
                         f"every manifest)")
    else:
        pairs = []
        for n in range(0, len(shards), 2):
            try:
                weight = float(shards[n])
            except (TypeError, ValueError):
                raise ValueError(f"data.shards[{n}]={shards[n]!r} is not a weight: give {form}") from None
            if not np.isfinite(weight) or weight < 0:
                raise ValueError(f"data.shards[{n}]={shards[n]!r}: the weight of {shards[n + 1]} must be a "
                                 f"non-negative number")
            pairs.append((weight, shards[n + 1]))
        if sum(w for w, _ in pairs) <= 0:
            raise ValueError("data.shards weights are all 0: give at least one source a positive weight")
    for _, manifest in pairs:
        if not isinstance(manifest, str):
            raise ValueError(f"data.shards: {manifest!r} is not a manifest path: give {form}")
    return pairs


def build_shard_source(shards: list, split: str, seq_length: int, seed: int, global_batch_size: int, streams: int,
                       tokenizer_vocab_size: int, shard_url: Optional[str] = None, decoder: str = "webdataset",
                       cache_shards: Optional[int] = None):
    """The ``split`` source of ``data.shards`` (:func:`parse_shard_blend`): a :class:`ShardDataset`
    for one manifest, a :class:`ShardBlend` for several. ``shard_url`` applies to every manifest."""
    pairs = parse_shard_blend(shards)
    common = dict(seq_length=seq_length, seed=seed, global_batch_size=global_batch_size, streams=streams,
                  tokenizer_vocab_size=tokenizer_vocab_size, shard_url=shard_url, decoder=decoder,
                  cache_shards=cache_shards)
    sources = [(weight, ShardDataset(manifest, split, **common)) for weight, manifest in pairs]
    return sources[0][1] if len(sources) == 1 else ShardBlend(sources)
