"""Both ProSeCo passes in ONE call of megatron-core's pipeline schedule.

Two schedule calls (MDM pass, then SC pass) pay the pipeline fill and drain twice: with p stages
and m micro-batches, (p - 1) / (2m + p - 1) of the step is extra bubble. A one-call step gives the
schedule 2m micro-batches, the MDM micro-batches 0..m-1 followed by the corrector (SC)
micro-batches 0..m-1, for the plain and the interleaved 1F1B schedules alike:

* y_i = argmax x_theta(z_t) of MDM micro-batch i appears on the last stage, in the loss function
  of that micro-batch. It is sent there and then (a non-blocking isend) to the first stage, which
  receives it (blocking) in the forward of SC micro-batch i, where it is the input ids. The last
  stage keeps its own copy for the SC loss; middle stages only need the shape. The messages travel
  on their own process group over the same pipeline ranks (`corrector_input_group`), so they never
  interleave with megatron's activation and gradient messages on the pipeline group (NCCL matches
  messages by order per communicator). Under TP, each TP rank of the last stage sends to its peer
  of the first stage: the pipeline groups are per TP rank.
* Safety (training/pipeline_order.py): "auto" uses one call only when megatron's own data flow
  already orders "last stage ran MDM forward i" before "first stage runs SC forward m+i", for
  every i: then y_i is always on its way when the first stage asks for it, whatever the transport.
  Non-interleaved that is m >= p; interleaved about m >= 2p - 1 (m >= 2p for m a multiple of p
  with megatron's default group size p), computed exactly by simulating megatron's order.
  Otherwise "auto" keeps the two calls; an explicit "one_call" still runs one call when the
  schedule cannot deadlock (non-interleaved: any m, proven in pipeline_order.py; interleaved:
  the simulated dataflow), the first stage then possibly waiting for y_i.
* Loss scale: megatron divides each micro-batch loss by the call's micro-batch count, 2m here
  against m per call in the two-call step, so each loss is multiplied by 2 (exact in floating
  point): the same gradients and reported losses as the two-call step.
* Gradient sync: one call is an ordinary megatron step: DDP's grad sync starts on the last
  micro-batch and `finalize_model_grads_func` runs once, at the end.

With PP=1 nothing travels: the corrector input is read from the step's own store.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from megatron.core import parallel_state

from .pipeline_order import one_call_deadlock_free, one_call_guaranteed

SCHEDULE_MODES = ("auto", "one_call", "two_call")
CONFIG_KEY = "train.proseco_schedule"


@dataclass(frozen=True)
class SchedulePlan:
    one_call: bool
    description: str  # one line for the trainer's start-up report


@lru_cache(maxsize=None)
def _guaranteed(p: int, vpp: int, m: int, group_size: int | None) -> bool:
    return one_call_guaranteed(p, vpp, m, group_size)


@lru_cache(maxsize=None)
def _deadlock_free(p: int, vpp: int, m: int, group_size: int | None) -> bool:
    return one_call_deadlock_free(p, vpp, m, group_size)


def plan_schedule(mode: str, p: int, vpp: int, m: int, group_size: int | None = None) -> SchedulePlan:
    """How a ProSeCo training step with m micro-batches per rank runs on p stages (vpp chunks)."""
    if mode not in SCHEDULE_MODES:
        raise ValueError(f"{CONFIG_KEY}={mode!r} is not a schedule mode; use one of {', '.join(SCHEDULE_MODES)}")
    layout = f"pp={p}" + (f" vpp={vpp}" if vpp > 1 else "") + f", {m} micro-batches"
    if mode == "two_call":
        return SchedulePlan(False, f"proseco schedule: two calls (MDM pass, then SC pass) as {CONFIG_KEY}=two_call asks ({layout})")
    safe = _guaranteed(p, vpp, m, group_size)
    if safe:
        why = "" if p == 1 else "; y_i is sent by the last stage before the first stage needs it"
        return SchedulePlan(True, f"proseco schedule: one call of {2 * m} micro-batches (MDM then SC, {layout}{why})")
    need = "m >= pp" if vpp == 1 else "more micro-batches (about m >= 2 pp - 1)"
    if mode == "one_call":
        if _deadlock_free(p, vpp, m, group_size):
            return SchedulePlan(True, f"proseco schedule: one call of {2 * m} micro-batches (MDM then SC, {layout}) as "
                                      f"{CONFIG_KEY}=one_call asks; the first stage may wait for y_i ({need} avoids that)")
        raise ValueError(f"{CONFIG_KEY}=one_call: megatron's schedule cannot run {2 * m} micro-batches in one call "
                         f"with the y hand-off at {layout}; use {need} (train.global_batch_size) or {CONFIG_KEY}=auto")
    return SchedulePlan(False, f"proseco schedule: two calls ({layout}: one call needs {need}, "
                               f"so that y_i is sent before the first stage needs it)")


_BY_RANKS: dict = {}  # pipeline ranks -> the y group over them
_CURRENT: list = [None, None]  # [megatron's pipeline group, its y group]


def corrector_input_group():
    """A process group over this rank's pipeline ranks, separate from megatron's pipeline group.
    Made once per layout: when megatron's pipeline group object changes (on every rank at once,
    as parallel_state is initialised), all ranks gather every pipeline group's ranks and create
    the missing y groups in the same order (new_group is collective over the world)."""
    pipeline = parallel_state.get_pipeline_model_parallel_group()
    if _CURRENT[0] is not pipeline:
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, tuple(torch.distributed.get_process_group_ranks(pipeline)))
        for ranks in sorted(set(everyone) - set(_BY_RANKS)):  # the same list on every rank
            _BY_RANKS[ranks] = torch.distributed.new_group(list(ranks))
        _CURRENT[:] = [pipeline, _BY_RANKS[tuple(torch.distributed.get_process_group_ranks(pipeline))]]
    return _CURRENT[1]


class CorrectorInputChannel:
    """y_i from the last pipeline stage to the first, micro-batch by micro-batch, in order."""

    def __init__(self):
        self.pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self.group = corrector_input_group() if self.pipelined else None
        self.first = parallel_state.get_pipeline_model_parallel_first_rank()
        self.last = parallel_state.get_pipeline_model_parallel_last_rank()
        self._pending = []

    def send(self, y: torch.Tensor) -> None:
        """Last stage, in the MDM loss function of micro-batch i (non-blocking)."""
        if self.pipelined:
            y = y.contiguous()
            self._pending.append((y, torch.distributed.isend(y, dst=self.first, group=self.group)))

    def receive(self, like: torch.Tensor) -> torch.Tensor:
        """First stage, in the forward of SC micro-batch i: waits for y_i."""
        y = torch.empty(like.shape, dtype=torch.long, device=like.device)
        torch.distributed.recv(y, src=self.last, group=self.group)
        return y

    def finish(self) -> None:
        """After the schedule: every send has completed (the first stage received them all)."""
        for _, work in self._pending:
            work.wait()
        self._pending.clear()
