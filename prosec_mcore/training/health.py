"""The healthy-state guard: no update from a NaN, and no checkpoint of a broken model.

A diverging run (learning rate far too high, a bad batch, an overflow in bf16) first shows up as a
non-finite loss or gradient norm. Applied, such an update writes NaN into every weight and the
Adam state; saved, it becomes `latest`, and pruning then deletes the healthy checkpoints. So every
iteration, *before* the optimizer step, the guard looks at the two numbers every rank already
shares (the loss is summed over the data-parallel and pipeline groups; the gradient norm over the
model-parallel group of identical data-parallel replicas) and decides:

    apply   the update goes ahead;
    skip    the update is dropped (gradients discarded, optimizer and LR schedule untouched);
    stop    the update is dropped and the run ends with a message naming the iteration.

`health.nonfinite` chooses between stop (default) and skip for NaN/Inf; `health.max_skipped` bounds
the skips of a run (a run that keeps producing NaNs is broken, not unlucky). Optional spike
detection compares the loss with the mean of the last `health.spike_window` applied iterations
and warns or skips above `health.spike_factor` times that mean.

Why not megatron-core's own tools: DDP's `check_for_nan_in_grad` raises on the rank that sees the
NaN (the others then wait in the next collective), and the rerun state machine re-executes an
iteration to tell a transient hardware fault from a persistent one, which needs the loop built
around its data-iterator wrapper. Here the numbers are already global, so a decision costs one
small all-reduce that makes every rank act alike even if a rank's view differed.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

APPLY, SKIP, STOP = 0, 1, 2  # ordered by severity: agree() takes the maximum over ranks


@dataclass
class Verdict:
    action: int
    reason: str = ""


class HealthGuard:
    """Decides, each iteration, whether the update may be applied (see the module docstring)."""

    def __init__(self, cfg, device=None):
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.skipped = 0  # updates skipped over the whole run (restored from checkpoints)
        self.last_incident: int | None = None  # the last iteration with a skip, a stop or a spike
        self._recent = deque(maxlen=max(cfg.spike_window, 1))

    # --------------------------------------------------------------- the decision
    def judge(self, iteration: int, loss: float, grad_norm: float) -> Verdict:
        """This rank's verdict from the iteration's loss and gradient norm (no communication)."""
        bad = [f"{name} is {value}" for name, value in (("the loss", loss), ("the gradient norm", grad_norm))
               if not math.isfinite(value)]
        if bad:
            reason = f"iteration {iteration}: {' and '.join(bad)}"
            return self._skip_or_stop(reason, self.cfg.nonfinite == "skip")
        if self.cfg.spike_factor > 0 and len(self._recent) == self._recent.maxlen:
            mean = sum(self._recent) / len(self._recent)
            if loss > self.cfg.spike_factor * mean:
                reason = (f"iteration {iteration}: loss spike, {loss:.4g} > health.spike_factor={self.cfg.spike_factor:g}"
                          f" x {mean:.4g} (mean of the last {len(self._recent)} iterations)")
                if self.cfg.spike_action == "warn":
                    return Verdict(APPLY, reason)
                return self._skip_or_stop(reason, True)
        return Verdict(APPLY)

    def _skip_or_stop(self, reason: str, skip_allowed: bool) -> Verdict:
        if skip_allowed and self.skipped < self.cfg.max_skipped:
            return Verdict(SKIP, reason)
        if skip_allowed:
            reason += f" (health.max_skipped={self.cfg.max_skipped} updates already skipped in this run)"
        return Verdict(STOP, reason)

    def agree(self, verdict: Verdict) -> Verdict:
        """Every rank takes the most severe verdict of any rank (one all-reduce of one number)."""
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return verdict
        flag = torch.tensor([float(verdict.action)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        action = int(flag.item())
        if action == verdict.action:
            return verdict
        return Verdict(action, verdict.reason or "another rank saw a non-finite loss or gradient norm")

    def record(self, iteration: int, verdict: Verdict, loss: float) -> None:
        """Count a skip, or remember an applied iteration's loss for spike detection."""
        if verdict.reason:
            self.last_incident = iteration
        if verdict.action == SKIP:
            self.skipped += 1
        elif verdict.action == APPLY:
            self._recent.append(loss)

    def healthy_at(self, iteration: int) -> bool:
        """Whether a checkpoint of `iteration` counts as healthy: no incident in the last
        spike_window iterations (checkpoint.py's pruning keeps the newest healthy checkpoint)."""
        return self.last_incident is None or iteration - self.last_incident >= self.cfg.spike_window

    # --------------------------------------------------------------- checkpoint state
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "recent": list(self._recent), "last_incident": self.last_incident}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.last_incident = state.get("last_incident")
        self._recent.clear()
        self._recent.extend(state.get("recent", []))


@torch.no_grad()
def state_is_finite(model_chunks, optimizer, device) -> bool:
    """True when every parameter, fp32 main weight and Adam moment of every rank is finite.

    Checked before each save so that a checkpoint never holds NaN/Inf (a collective: one
    all-reduce). Reads each tensor once; on a GPU this costs a fraction of the save itself."""
    tensors = [p for chunk in model_chunks for p in chunk.parameters()]
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                tensors.append(p)
                tensors.extend(v for v in inner.state.get(p, {}).values()
                               if isinstance(v, torch.Tensor) and v.is_floating_point())
    ok = all(bool(torch.isfinite(t).all()) for t in tensors)
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's (chained) optimizer: they hold the main weights and
    the Adam state that a checkpoint saves."""
    if optimizer is None:
        return []
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in chained if getattr(o, "optimizer", None) is not None]
