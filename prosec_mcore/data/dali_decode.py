"""Decode one token shard with NVIDIA DALI (``data.loader=dali``).

The job is the same as the webdataset decoder's in data/shard_dataset.py: read every sample of
one tar shard, in tar order, into an int array ``[n, seq_length]``. DALI does it with a small
pipeline::

    raw = fn.readers.webdataset(paths=[shard], ext=["tokens.npy"], random_shuffle=False)
    tokens = fn.decoders.numpy(raw)

The reader never stops by itself: after the last sample of the tar it starts the tar again
(the next "epoch"), and a batch that straddles the end holds samples from the start. So we run
``ceil(n / batch)`` batches and keep the first ``n`` samples, where ``n`` is the reader's own
epoch size, checked against the manifest's count.

DALI reads local files only (no ``pipe:`` or ``https://``); the numpy decoder runs on the CPU.
On a GPU machine the pipeline is bound to ``torch.cuda.current_device()`` and still returns host
arrays. DALI is an optional dependency, imported only when this decoder is used.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

INSTALL_HINT = "pip install nvidia-dali-cuda120"
_MAX_BATCH = 512


def require_dali() -> None:
    """Import DALI, or raise a one-line ValueError saying how to install it (a run configured for
    a loader this machine lacks is a configuration error, refused before training starts)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
    except ImportError:
        raise ValueError(f"data.loader=dali needs NVIDIA DALI, which is not installed: {INSTALL_HINT} "
                         f"(or use data.loader=webdataset)") from None


def _device_id() -> Optional[int]:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def decode_shard_dali(path: str, seq_length: int, num_samples: Optional[int] = None) -> np.ndarray:
    """Every ``tokens.npy`` of the local tar shard ``path``, in tar order, as an array
    ``[n, seq_length]`` (the stored dtype). ``num_samples`` (the manifest's count), when given,
    must equal the number of samples DALI finds. A sample without ``tokens.npy``, a sample of
    another length, an unreadable tar or a different count is a one-line ValueError naming the
    shard."""
    require_dali()
    from nvidia.dali import fn, pipeline_def

    reader_name = "shard"

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def shard_pipeline():
        raw = fn.readers.webdataset(paths=[path], ext=["tokens.npy"], random_shuffle=False,
                                    missing_component_behavior="error", name=reader_name)
        return fn.decoders.numpy(raw)

    batch = max(1, min(num_samples or _MAX_BATCH, _MAX_BATCH))
    try:
        pipe = shard_pipeline(batch_size=batch, device_id=_device_id())
        pipe.build()
        n = int(pipe.epoch_size(reader_name))
    except RuntimeError as err:
        raise ValueError(f"DALI cannot read the shard {path} ({_first_line(err)}); every sample needs a "
                         f"tokens.npy field: re-copy the shard or re-write the shard set") from None
    if num_samples is not None and n != num_samples:
        raise ValueError(f"shard {path} holds {n} samples but its manifest says {num_samples}; re-copy it or "
                         f"re-write the shard set")
    rows = []
    try:
        while len(rows) < n:  # the last batch may wrap around to the tar's start: dropped below
            (out,) = pipe.run()
            rows.extend(np.asarray(out[i]) for i in range(len(out)))
    except RuntimeError as err:
        raise ValueError(f"DALI cannot decode the shard {path} ({_first_line(err)}); each sample needs a "
                         f"tokens.npy field; re-write the shard set") from None
    finally:
        del pipe
    rows = rows[:n]
    for r, row in enumerate(rows):
        if row.shape != (seq_length,):
            raise ValueError(f"shard {path}: sample {r} holds tokens of shape {row.shape}, expected "
                             f"({seq_length},); re-write the shard set with this seq_length")
    return np.stack(rows) if rows else np.zeros((0, seq_length), dtype=np.int32)


def _first_line(err: BaseException) -> str:
    """DALI's reason: the line after "encountered:" (its errors open with a generic line and the
    pipeline's traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for before, line in zip(lines, lines[1:]):
        if before == "encountered:":
            return line
    return lines[0] if lines else type(err).__name__
