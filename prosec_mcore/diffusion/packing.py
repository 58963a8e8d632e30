"""Packed samples: attention that stays inside a document, and LLaDA-style variable-length samples.

A training sample is a window of L tokens cut from the concatenation of the corpus's documents,
each closed by an EOD token, so one sample holds the end of a document, a few whole ones and the
start of the next. By default attention is bidirectional over the whole window. Two options
restrict it (data.document_attention, data.variable_length_fraction); both are written as
*segment ids*, one per position: position i may attend to position j iff segment[i] == segment[j].
Segment ids never decrease along a sample, so every segment is one contiguous run of positions.

Documents (data.document_attention). Position i belongs to document number "EOD tokens strictly
before i": an EOD closes its document and belongs to it (Megatron-LM's reset_attention_mask
convention). The ids come from the clean tokens x, never from a model input (z_t holds mask
tokens, y the network's guesses), so both passes of a ProSeCo step, x_theta(z_t) and x_theta(y),
see the same segments.

Variable length (data.variable_length_fraction = f). LLaDA's pre-training gives 1% of its samples
a random length, uniform in [1, L], so the model also meets short sequences. Here each sample
draws, from a generator keyed by (seed, STREAM_VARIABLE_LENGTH, sample index) like the rest of the
noise (diffusion/noise.py), a uniform u and a length l uniform in [1, L]; the sample is cut when
u < f. Positions >= l are the removed part: the forward process never masks them, they add exactly
0 to both loss terms and to every reported count, their input is the pad token, and they form a
segment of their own, so no kept position attends to them (with or without document attention).

LLaDA truncates the whole batch instead (its removed positions do not exist). We keep every
micro-batch [b, L] because megatron's pipeline schedule sends fixed-shape activations between
stages (allocated from seq_length) and sequence parallelism splits L evenly over the tensor-
parallel ranks; and the loss stays normalised per position of the full samples (sum / (m L), as
without cuts), so it does not depend on how a global batch is split into micro-batches and ranks.

How attention is restricted depends on the layers (model/layer_specs.py):
  local (SDPA or megatron's unfused attention)  a bool mask [b, 1, L, L], True = masked out
                   (megatron's convention; `attention_mask_from_segments`);
  te               megatron's PackedSeqParams in the `thd` format: the segments of the sample are
                   its packed sequences (`cu_seqlens_from_segments`). megatron's thd path takes
                   one sample per micro-batch (its batch dimension is squeezed away), and adaLN's
                   per-sample time conditioning forbids folding a batch into one pack, so it needs
                   train.micro_batch_size=1.
Rotary embeddings are relative (q_i . k_j depends on i - j only), so once attention stays inside a
document its outputs do not depend on where the document sits in the pack: position ids are not
reset (tests/unit/test_document_attention.py measures it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .noise import STREAM_VARIABLE_LENGTH, NoisedBatch, keyed_generator


@dataclass
class PackingSettings:
    """How a training step treats the packing of its samples (ProSeCoStep's `packing`).

    document_attention: attention never crosses an EOD boundary (needs `eod_id`).
    variable_length_fraction: the fraction of samples cut to a random length (training passes only:
        `ProSeCoStep.run` cuts when it runs a backward, unless told otherwise).
    seed: the run seed (the cuts are drawn from (seed, sample index)).
    pad_id: the model input at removed positions (None: the clean tokens, unmasked).
    """

    document_attention: bool = False
    eod_id: Optional[int] = None
    variable_length_fraction: float = 0.0
    seed: int = 0
    pad_id: Optional[int] = None

    def __post_init__(self):
        if self.document_attention and self.eod_id is None:
            raise ValueError("data.document_attention=true needs the tokenizer's EOD id (PackingSettings.eod_id)")
        if not 0.0 <= self.variable_length_fraction <= 1.0:
            raise ValueError(f"data.variable_length_fraction must lie in [0, 1] (got {self.variable_length_fraction})")

    @property
    def restricts_attention(self) -> bool:
        return self.document_attention or self.variable_length_fraction > 0


def document_segments(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, L] int64: the number of EOD tokens strictly before each position (its document)."""
    eod = (tokens == eod_id).long()
    return eod.cumsum(dim=-1) - eod


def cut_lengths(seed: int, sample_index: torch.Tensor, seq_length: int, fraction: float,
                stream: int = STREAM_VARIABLE_LENGTH) -> torch.Tensor:
    """The kept length of each sample, [b] int64 on CPU: seq_length, or with probability `fraction` a
    length uniform in [1, seq_length]. Both draws come from the generator keyed by (seed, stream,
    sample index), so every rank, stage and resumed run cuts a sample identically."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be at least 1 (got {seq_length})")
    lengths = []
    for index in sample_index.tolist():
        gen = keyed_generator(seed, stream, index)
        u = torch.rand(1, generator=gen, dtype=torch.float64).item()
        length = int(torch.randint(1, seq_length + 1, (1,), generator=gen).item())
        lengths.append(length if u < fraction else seq_length)
    return torch.tensor(lengths, dtype=torch.long)


def kept_positions(lengths: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[b, L] bool: True at the positions a sample keeps (position < its length)."""
    return torch.arange(seq_length, device=lengths.device)[None, :] < lengths[:, None]


def segment_ids(tokens: torch.Tensor, eod_id: Optional[int] = None, lengths: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """[b, L] int64 segment ids of clean tokens: documents when `eod_id` is given (else one segment),
    and, with `lengths`, the removed part of each cut sample as one more segment after the last kept."""
    segments = document_segments(tokens, eod_id) if eod_id is not None else torch.zeros_like(tokens)
    if lengths is None:
        return segments
    lengths = lengths.to(tokens.device)
    last_kept = segments.gather(1, (lengths - 1)[:, None])
    return torch.where(kept_positions(lengths, tokens.shape[1]), segments, last_kept + 1)


def attention_mask_from_segments(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, L, L] bool in megatron's convention, True = masked out: query i may not see key j when
    they lie in different segments. (PyTorch's SDPA takes the inverse, True = attend.)"""
    return segments[:, None, :, None] != segments[:, None, None, :]


def cu_seqlens_from_segments(segments: torch.Tensor) -> torch.Tensor:
    """Cumulative segment lengths, int32 [n + 1] from 0 to b * L, for segments [L] or [b, L] read as
    one flat pack (a new sample always starts a new segment): the `cu_seqlens` of the thd format."""
    flat = segments.reshape(-1, segments.shape[-1])
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[:, 1:] = flat[:, 1:] != flat[:, :-1]
    offsets = torch.nonzero(starts.reshape(-1)).squeeze(1)
    end = torch.tensor([flat.numel()], device=flat.device)
    return torch.cat([offsets, end]).to(torch.int32)


def packed_seq_params_from_segments(segments: torch.Tensor):
    """megatron's PackedSeqParams (thd) for the segments [1, L] of one sample (Transformer Engine)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if segments.shape[0] != 1:
        raise ValueError(f"document attention / variable-length samples on the Transformer Engine layers use "
                         f"megatron's thd format, which takes one sample per micro-batch (got {segments.shape[0]}); "
                         f"set train.micro_batch_size=1")
    cu_seqlens = cu_seqlens_from_segments(segments)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def attention_inputs(segments: torch.Tensor, backend: str) -> dict:
    """The model's keyword arguments that keep attention inside segments: `attention_mask` for the
    local layers, `packed_seq_params` for Transformer Engine's (backend "te")."""
    if backend == "te":
        return {"packed_seq_params": packed_seq_params_from_segments(segments)}
    return {"attention_mask": attention_mask_from_segments(segments)}


def cut_noised_batch(noised: NoisedBatch, lengths: torch.Tensor, pad_id: Optional[int]) -> None:
    """Remove the tail (positions >= length) of each sample of a noised micro-batch, in place: the
    removed positions are unmasked, marked in `noised.keep`, and their input becomes `pad_id`."""
    keep = kept_positions(lengths.to(noised.clean.device), noised.clean.shape[1])
    fill = noised.clean if pad_id is None else torch.full_like(noised.clean, pad_id)
    noised.keep = keep
    noised.masked = noised.masked & keep
    noised.noised = torch.where(keep, noised.noised, fill)


def fill_removed_positions(noised: NoisedBatch, tokens: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    """`tokens` (a model input such as the corrector input y) with the removed positions set as
    `cut_noised_batch` sets them; unchanged when nothing was cut."""
    if noised.keep is None:
        return tokens
    fill = noised.clean if pad_id is None else torch.full_like(tokens, pad_id)
    return torch.where(noised.keep, tokens, fill)


def pack_microbatch(sample_index: torch.Tensor, noised: NoisedBatch, settings: PackingSettings,
                    cut: bool) -> Optional[torch.Tensor]:
    """Apply `settings` to one noised micro-batch: cut its samples (when `cut`; in place) and return
    the segment ids of its forward passes, [b, L], or None when attention is unrestricted. (The step
    turns them into a mask only for the forward that uses it: a [b, 1, L, L] mask per micro-batch of
    a whole global batch would hold L^2 bytes per sample, 16 MiB at L = 4096.)"""
    seq_length = noised.clean.shape[1]
    lengths = None
    if cut and settings.variable_length_fraction > 0:
        drawn = cut_lengths(settings.seed, sample_index, seq_length, settings.variable_length_fraction)
        if bool((drawn < seq_length).any()):
            lengths = drawn
            cut_noised_batch(noised, lengths, settings.pad_id)
    if not settings.document_attention and lengths is None:
        return None  # nothing restricts attention: the unmasked computation
    return segment_ids(noised.clean, settings.eod_id if settings.document_attention else None, lengths)
