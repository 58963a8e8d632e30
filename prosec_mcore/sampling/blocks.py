"""The paper's sampler for SFT models: semi-autoregressive blocks, k tokens per step, corrector
loops between steps, stop at EOS (LLaDA's ``generate`` with ProSeCo's corrector, as the paper's
authors run LLaDA-8B; docs/sampling.md, "The block sampler").

Each row r of a batch has a response region of ``gen_length`` masked positions starting at its
own ``response_start[r]`` (prompts differ in length); everything outside the region (the prompt,
the EOS filler after it) is fixed. The region is cut into blocks of ``block_length`` positions,
counted from the row's response start, and the blocks are decoded left to right:

* **k tokens per step.**  The ``steps`` unmasking steps are split evenly over the blocks
  (``steps / num_blocks`` per block). A block of n masked positions decoded in s steps commits
  ``n // s`` tokens per step, one more in the first ``n % s`` steps (LLaDA's
  ``get_num_transfer_tokens``: :func:`transfer_schedule`); which ones: the most confident
  (``remasking="low_confidence"``: the probability of the proposed token) or random ones
  (``"random"``). With a ``threshold`` (Fast-dLLM) a step instead commits every position whose
  confidence is >= threshold, and at least the most confident one, until the block is full.
* **Proposals.**  ``temperature = 0``: the argmax token. ``temperature = T > 0``: Gumbel-max
  in float64, argmax of p / E^T with E ~ Exp(1), which draws from softmax(log p / T) (LLaDA's
  ``add_gumbel_noise``); the confidence stays the untempered probability of the drawn token.
* **Corrector loops.**  Every ``corrector.every``-th step of a block (the step counter restarts
  in each block), before committing: the draft is the sequence with every mask (this block's and
  the later blocks') filled by the step's argmax; up to ``corrector.steps`` updates
  y <- argmax p_theta(. | y) (or ``sample`` / ``top_k``, steps.py) change positions of the
  response **up to the end of the current block** only, and a row leaves the loop at a fixed
  point (an update that changed nothing). The corrected tokens overwrite the positions already
  decoded, and the step commits from the corrector's last output (no extra evaluation).
* **Stop at EOS** (``eos_stop``).  ``block`` (the reference's rule): when a row completes a
  block whose last position is EOS, its response has ended: the rest of its region is filled with
  EOS and the row takes part in no further evaluation. ``any``: the same as soon as a completed
  block holds an EOS anywhere in the row's decoded response (the response, cut at its first EOS,
  is then final unless a later corrector loop would rewrite that EOS: saves more, corrects
  less). ``off``: decode every block.

**Rows are independent.**  The reference runs one block index and one step counter for the whole
batch and checks EOS for all rows at once, so a row's result depends on the rows beside it (with
a threshold, a row that finished its block early still goes through the others' corrector loops).
Here every row keeps its own block, step counter, fixed-point exit and EOS stop; each network
pass evaluates only the rows that need it. For deterministic settings (temperature 0, confidence
ordering) a row's tokens and NFE are those it gets alone, for a model whose output at a row
depends on that row only. NFE is counted per batch (network passes, of any number of rows) and
per row (the passes the row took part in), split into unmasking and correcting.

The reference (kuleshov-group/proseco, ``llada/generate.py``) is followed step for step where it
runs a single row; docs/sampling.md lists the departures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .samplers import SampleResult, initial_sequence
from .steps import CorrectorSettings, corrector_taus, corrector_update, fill_masks_with_argmax

REMASKING = ("low_confidence", "random")
EOS_STOPS = ("block", "any", "off")


@dataclass
class BlockResult(SampleResult):
    """A batch's tokens and NFE (network passes), plus per-row NFE: the passes each row was in."""

    row_nfe_unmask: list = field(default_factory=list)
    row_nfe_correct: list = field(default_factory=list)
    eos_stopped: list = field(default_factory=list)  # rows that stopped at EOS before the last block

    def row_stats(self, row: int) -> dict:
        unmask, correct = self.row_nfe_unmask[row], self.row_nfe_correct[row]
        return {"nfe": unmask + correct, "nfe_unmask": unmask, "nfe_correct": correct}


def transfer_schedule(masked: int, steps: int) -> list[int]:
    """How many of a block's ``masked`` positions each of its ``steps`` steps commits: ``masked //
    steps`` each, one more in the first ``masked % steps`` steps (LLaDA's
    ``get_num_transfer_tokens``). With steps > masked the trailing steps commit 0; the block is
    full before they come, so they are never run."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def check_block_settings(gen_length: int, steps: int, block_length: int, remasking: str = "low_confidence",
                         temperature: float = 0.0, threshold: Optional[float] = None,
                         eos_stop: str = "block") -> int:
    """Refuse impossible settings; returns the steps per block."""
    if block_length < 1 or gen_length < 1 or gen_length % block_length:
        raise ValueError(f"the generation length {gen_length} must be a positive multiple of the block "
                         f"length {block_length}")
    blocks = gen_length // block_length
    if steps < 1 or steps % blocks:
        raise ValueError(f"steps {steps} must be a positive multiple of the number of blocks {blocks} "
                         f"(generation length {gen_length} / block length {block_length})")
    if remasking not in REMASKING:
        raise ValueError(f"remasking {remasking!r}: choose one of {REMASKING}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] or None (off), got {threshold}")
    if eos_stop not in EOS_STOPS:
        raise ValueError(f"eos_stop {eos_stop!r}: choose one of {EOS_STOPS}")
    return steps // blocks


def _rows(labels, index: torch.Tensor):
    """The labels of the rows ``index`` (a label per row), or the shared label as it is."""
    if isinstance(labels, torch.Tensor) and labels.dim() > 0 and labels.shape[0] > 1:
        return labels[index]
    return labels


class _Counter:
    """Network passes of a batch and per row, by kind (unmask / correct)."""

    def __init__(self, batch_size: int, cost: int):
        self.cost, self.passes = cost, {"unmask": 0, "correct": 0}
        self.rows = {"unmask": torch.zeros(batch_size, dtype=torch.long),
                     "correct": torch.zeros(batch_size, dtype=torch.long)}

    def add(self, kind: str, rows: torch.Tensor) -> None:
        self.passes[kind] += self.cost
        self.rows[kind][rows] += self.cost


def _propose(log_probs: torch.Tensor, temperature: float, remasking: str, generator: torch.Generator):
    """(proposed tokens, confidence) for ``log_probs [n, b, V]``, both [n, b]."""
    if temperature == 0:
        proposal = log_probs.argmax(dim=-1)
    else:  # Gumbel-max at temperature T: argmax p / E^T, E ~ Exp(1), in float64
        uniform = torch.rand(log_probs.shape, generator=generator, dtype=torch.float64)
        exponential = -torch.log(uniform.clamp_min(1e-300))
        proposal = (log_probs.exp() / exponential.pow(temperature)).argmax(dim=-1)
    if remasking == "low_confidence":
        confidence = log_probs.gather(-1, proposal.unsqueeze(-1)).squeeze(-1).exp()
    else:
        confidence = torch.rand(proposal.shape, generator=generator, dtype=torch.float64)
    return proposal, confidence


def _choose(confidence: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor,
            threshold: Optional[float]) -> torch.Tensor:
    """Which candidate positions ([n, b] bool) a step commits: the k most confident (ties: the
    leftmost), or with a threshold every one at or above it plus the most confident."""
    confidence = confidence.masked_fill(~candidates, float("-inf"))
    if threshold is not None:
        chosen = candidates & (confidence >= threshold)
        best = confidence.argmax(dim=1, keepdim=True)
        return (chosen | torch.zeros_like(chosen).scatter(1, best, True)) & candidates
    order = confidence.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return candidates & (rank < k.unsqueeze(1))


def _corrector_sigma(schedule, corrector: CorrectorSettings, j: int, sigma_t: torch.Tensor) -> torch.Tensor:
    if corrector.time == "t":
        return sigma_t
    tau = corrector_taus(corrector.steps)[j]
    return schedule.sigma(torch.full(sigma_t.shape, tau, dtype=torch.float64))


def correct_rows(denoiser, draft: torch.Tensor, log_probs: torch.Tensor, region: torch.Tensor,
                 sigma_t: torch.Tensor, corrector: CorrectorSettings, generator: torch.Generator,
                 schedule, labels, rows: torch.Tensor, counter: _Counter):
    """One corrector loop on the rows of ``draft [n, L]`` (no masks): up to S updates of the
    ``region`` positions ([n, L] bool; the rest is frozen), each row leaving at its own fixed
    point. ``rows`` are the batch indices of the n rows (for the NFE counts and labels). Returns
    (corrected tokens, the last output of each row, rows that left before S evaluations)."""
    y, last = draft.clone(), log_probs.clone()
    live = torch.ones(len(y), dtype=torch.bool)    # still updating
    reuse = torch.zeros(len(y), dtype=torch.bool)  # sample mode: the last draw changed nothing
    evaluations = torch.zeros(len(y), dtype=torch.long)
    for j in range(corrector.steps):
        evaluate = (live & ~reuse).nonzero().flatten()
        if evaluate.numel():
            last[evaluate] = denoiser(y[evaluate], _corrector_sigma(schedule, corrector, j, sigma_t[evaluate]),
                                      _rows(labels, rows[evaluate]))
            evaluations[evaluate] += 1
            counter.add("correct", rows[evaluate])
        updating = live.nonzero().flatten()
        new = corrector_update(y[updating], last[updating], corrector, generator, ~region[updating])
        unchanged = (new == y[updating]).all(dim=1)
        y[updating] = new
        if corrector.early_stop:
            if corrector.mode == "sample":  # draw again from the same output, at no evaluation
                reuse[updating] = unchanged
            else:  # a fixed point: every further update would return this y again
                live[updating[unchanged]] = False
        if not bool(live.any()):
            break
    return y, last, evaluations < corrector.steps


def sample_blocks(denoiser, schedule, tokens: torch.Tensor, response_start, gen_length: int,
                  generator: torch.Generator, steps: int, block_length: int,
                  remasking: str = "low_confidence", temperature: float = 0.0, threshold: Optional[float] = None,
                  corrector: Optional[CorrectorSettings] = None, eos_id: Optional[int] = None,
                  eos_stop: str = "block", labels=None) -> BlockResult:
    """Decode the response regions of ``tokens [B, L]`` (row r: ``gen_length`` masks from
    ``response_start[r]``; nothing else masked) block by block, as the module docstring says.
    ``eos_id`` None disables the EOS stop. Returns the tokens (no mask left) and the NFE."""
    steps_per_block = check_block_settings(gen_length, steps, block_length, remasking, temperature,
                                           threshold, eos_stop)
    corrector = corrector or CorrectorSettings(steps=0)
    mask_id, (batch, length) = denoiser.mask_id, tokens.shape
    start = torch.as_tensor(response_start, dtype=torch.long).reshape(batch)
    positions = torch.arange(length)
    response = (positions >= start[:, None]) & (positions < (start + gen_length)[:, None])
    if int((start + gen_length).max()) > length or not torch.equal(tokens == mask_id, response):
        raise ValueError("every row must hold exactly gen_length masks, from its response start on")
    x, num_blocks = tokens.clone(), gen_length // block_length
    block = torch.zeros(batch, dtype=torch.long)  # each row's current block
    step = torch.zeros(batch, dtype=torch.long)   # each row's step within it
    done = torch.zeros(batch, dtype=torch.bool)
    stopped = torch.zeros(batch, dtype=torch.bool)
    schedule_k = torch.tensor(transfer_schedule(block_length, steps_per_block) + [0])
    counter, result = _Counter(batch, denoiser.evals_per_call), BlockResult(x)
    offsets = torch.arange(block_length)
    while not bool(done.all()):
        rows = (~done).nonzero().flatten()
        xa = x[rows]
        block_start = start[rows] + block[rows] * block_length
        index = block_start[:, None] + offsets                      # [n, b]: the block's positions
        region = (positions >= start[rows, None]) & (positions < (block_start + block_length)[:, None])
        t = (xa == mask_id).sum(dim=1).to(torch.float64) / gen_length  # the masked fraction of the response
        sigma = schedule.sigma(t)
        log_probs = denoiser(xa, sigma, _rows(labels, rows))
        counter.add("unmask", rows)
        due = ((step[rows] + 1) % corrector.every == 0) if corrector.steps else torch.zeros_like(rows, dtype=torch.bool)
        if bool(due.any()):
            d = due.nonzero().flatten()
            draft = fill_masks_with_argmax(xa[d], log_probs[d], mask_id)
            y, last, early = correct_rows(denoiser, draft, log_probs[d], region[d], sigma[d], corrector,
                                          generator, schedule, labels, rows[d], counter)
            xa[d] = torch.where(xa[d] != mask_id, y, xa[d])  # corrected tokens where already decoded
            log_probs[d] = last                                # commit from the corrector's output
            result.corrector_loops += 1
            result.early_stops += int(early.all())
        block_log_probs = log_probs.gather(1, index[..., None].expand(-1, -1, log_probs.shape[-1]))
        current = xa.gather(1, index)
        proposal, confidence = _propose(block_log_probs, temperature, remasking, generator)
        commit = _choose(confidence, current == mask_id, schedule_k[step[rows].clamp_max(steps_per_block)],
                         threshold)
        xa.scatter_(1, index, torch.where(commit, proposal, current))
        step[rows] += 1
        full = ~(xa.gather(1, index) == mask_id).any(dim=1)
        ended = torch.zeros_like(full)
        if eos_id is not None and eos_stop == "block":
            ended = full & (xa.gather(1, index[:, -1:]).squeeze(1) == eos_id)
        elif eos_id is not None and eos_stop == "any":
            ended = full & ((xa == eos_id) & region).any(dim=1)
        last_block = full & (block[rows] + 1 == num_blocks)
        if bool(ended.any()):  # the response has ended: EOS in the rest of its region
            xa[ended] = xa[ended].masked_fill(xa[ended] == mask_id, eos_id)
        x[rows] = xa
        done[rows] |= ended | last_block
        stopped[rows] |= ended & ~last_block
        moving = rows[full & ~ended & ~last_block]
        block[moving] += 1
        step[moving] = 0
    result.tokens = x
    result.nfe_unmask, result.nfe_correct = counter.passes["unmask"], counter.passes["correct"]
    result.row_nfe_unmask = counter.rows["unmask"].tolist()
    result.row_nfe_correct = counter.rows["correct"].tolist()
    result.eos_stopped = stopped.tolist()
    return result


def sample_blocks_prefix(denoiser, schedule, batch_size: int, length: int, generator: torch.Generator,
                         steps: int, block_length: int, prompt=None, prompt_mask=None, **kwargs) -> BlockResult:
    """The block sampler on unprompted sequences (the whole length is the response) or after a
    fixed prefix (the same for every row): what ``generate`` / ``--prompt`` use. Infilling
    templates (fixed positions after the first generated one) do not fit blocks: refused."""
    z, frozen = initial_sequence(batch_size, length, denoiser.mask_id, prompt, prompt_mask)
    prefix = 0 if frozen is None else int(frozen[0].long().cumprod(0).sum())
    if frozen is not None and (bool(frozen[:, prefix:].any()) or not torch.equal(frozen, frozen[:1].expand_as(frozen))):
        raise ValueError("the block sampler generates after a prefix: it cannot fill a template's blanks "
                         "(use --prompt, or another sampler)")
    return sample_blocks(denoiser, schedule, z, [prefix] * batch_size, length - prefix, generator, steps,
                         block_length, **kwargs)
