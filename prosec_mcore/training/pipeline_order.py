"""The order in which megatron-core's 1F1B schedules run forward and backward steps, and what
follows from it for a ProSeCo step that runs both passes in one schedule call.

A one-call ProSeCo step (training/one_call.py) feeds the schedule 2m micro-batches: the MDM
micro-batches 0..m-1, then the corrector (SC) micro-batches 0..m-1. SC micro-batch i takes
y_i = argmax x_theta(z_t) of MDM micro-batch i as its input ids, and y_i exists only on the last
stage, after the forward of MDM micro-batch i (in its loss function). The last stage sends y_i to
the first stage there and then; the first stage receives it in the forward of SC micro-batch m+i.

Whether that is safe depends on the order each rank runs its steps, which this module takes from
megatron-core itself (`get_pp_rank_microbatches`, `get_schedule_table`): for pipeline rank r,

    non-interleaved  w = min(p - 1 - r, N) warm-up forwards, then (forward w+j, backward j) pairs,
                     then the remaining backwards;
    interleaved      the same over the N*v virtual micro-batches of megatron's schedule table
                     (chunk c of rank r is virtual stage c*p + r; backward k runs the chunks in
                     reverse), with w = 2(p - 1 - r) + (v - 1) * group_size warm-up forwards.

Data flow between steps: forward (mb, s) needs forward (mb, s - 1); backward (mb, s) needs
backward (mb, s + 1). `simulate` runs these orders as a dataflow graph, optionally with step
durations, and answers two questions:

* guarantee: is the forward of MDM micro-batch i on the last virtual stage an *ancestor* of the
  forward of SC micro-batch m+i on the first virtual stage, for every i? Then y_i has been sent
  before the first stage waits for it, whatever the transport does (buffered or rendezvous sends,
  NCCL or gloo): the blocking receive cannot deadlock. Non-interleaved: this holds iff m >= p
  (the first stage's forward m+i follows its backward of m+i-p, which needed the last stage's
  forward of m+i-p, at or after that of i). Interleaved: see `one_call_guaranteed`.
* deadlock: with the y edges added, does the graph still complete (`stuck` False)? That is the
  weaker, dataflow-only condition that an explicit one_call accepts (`one_call_deadlock_free`).

Neither models megatron's overlap_p2p_comm variants or GPU stream scheduling; the one-call
condition comes from megatron's order of compute steps, which those do not change.

With durations (forward f and backward b per stage, split evenly over the chunks, plus a
per-message latency) the same run is a timeline model of the step (benchmarks/one_call_schedule.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table


def rank_order(p: int, rank: int, vpp: int, n: int, group_size: int | None = None) -> list:
    """The steps of pipeline rank `rank`, in the order megatron-core runs them for n micro-batches:
    a list of ("F" | "B", micro-batch, virtual stage). vpp=1: the non-interleaved schedule."""
    if vpp == 1:
        warmup = min(p - 1 - rank, n)
        forwards = [(mb, rank) for mb in range(n)]
        backwards = forwards
    else:
        group = group_size or p
        fake = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: p, rank=lambda: rank),
                               virtual_pipeline_model_parallel_size=vpp)
        _, _, warmup, _ = get_pp_rank_microbatches(n, vpp, group, p2p_communicator=fake)
        table = get_schedule_table(n, vpp, group)
        forwards = [(mb, chunk * p + rank) for mb, chunk in table]
        backwards = [(mb, (vpp - 1 - chunk) * p + rank) for mb, chunk in table]
    total = len(forwards)
    order = [("F",) + forwards[k] for k in range(warmup)]
    for j in range(total - warmup):
        order += [("F",) + forwards[warmup + j], ("B",) + backwards[j]]
    order += [("B",) + backwards[j] for j in range(total - warmup, total)]
    return order


@dataclass
class Simulation:
    stuck: bool  # some rank waits forever (a cycle in the dataflow graph)
    finish: dict  # step -> finish time
    clock: dict  # step -> vector clock: per rank, how many of its steps precede or are this step
    makespan: float


def simulate(p: int, vpp: int, n: int, group_size: int | None = None, *, y_offset: int | None = None,
             forward: float = 1.0, backward: float = 2.0, latency: float = 0.0) -> Simulation:
    """Run every rank's `rank_order` as a dataflow graph. y_offset=m adds the ProSeCo edges
    forward (i, last virtual stage) -> forward (m + i, virtual stage 0) for i < m. `forward` and
    `backward` are one rank's times for one micro-batch (all its chunks); `latency` per message."""
    last = p * vpp - 1
    orders = [rank_order(p, r, vpp, n, group_size) for r in range(p)]
    cost = {"F": forward / vpp, "B": backward / vpp}
    finish, clock = {}, {}
    position = [0] * p
    free_at = [0.0] * p
    rank_clock = [[0] * p for _ in range(p)]  # the clock of each rank's latest step
    progressed = True
    while progressed:
        progressed = False
        for r in range(p):
            while position[r] < len(orders[r]):
                step = orders[r][position[r]]
                kind, mb, stage = step
                deps = []
                if kind == "F" and stage > 0:
                    deps.append(("F", mb, stage - 1))
                if kind == "B":
                    deps.append(("B", mb, stage + 1) if stage < last else ("F", mb, stage))
                if kind == "F" and stage == 0 and y_offset is not None and y_offset <= mb < 2 * y_offset:
                    deps.append(("F", mb - y_offset, last))
                if any(d not in finish for d in deps):
                    break
                vector = rank_clock[r]
                start = free_at[r]
                for d in deps:
                    vector = [max(a, b) for a, b in zip(vector, clock[d])]
                    start = max(start, finish[d] + (latency if d[2] % p != r else 0.0))
                vector[r] = position[r] + 1
                finish[step] = free_at[r] = start + cost[kind]
                clock[step] = rank_clock[r] = vector
                position[r] += 1
                progressed = True
    stuck = any(position[r] < len(orders[r]) for r in range(p))
    return Simulation(stuck, finish, clock, max(free_at))


def y_sent_before_needed(p: int, vpp: int, m: int, group_size: int | None = None) -> bool:
    """For every i: megatron's own data flow puts the last stage's forward of MDM micro-batch i
    before the first stage's forward of SC micro-batch m+i (see the module docstring)."""
    sim = simulate(p, vpp, 2 * m, group_size)
    last_rank, last = p - 1, p * vpp - 1
    order = rank_order(p, last_rank, vpp, 2 * m, group_size)
    index = {step: k + 1 for k, step in enumerate(order)}
    return all(sim.clock[("F", m + i, 0)][last_rank] >= index[("F", i, last)] for i in range(m))


def interleaved_accepts(p: int, n: int, group_size: int | None = None) -> bool:
    """Whether megatron-core's interleaved schedule takes n micro-batches (its own two checks)."""
    group = group_size or p
    return group <= n and not 0 < n % group < p


def one_call_guaranteed(p: int, vpp: int, m: int, group_size: int | None = None) -> bool:
    """The condition one_call.py uses: PP=1 always; else y_sent_before_needed (non-interleaved:
    exactly m >= p; interleaved: about m >= 2p - 1, e.g. m >= 2p for m a multiple of p with
    megatron's default group size p; tests/distributed/test_one_call_schedule.py), and, when
    interleaved, megatron accepting 2m micro-batches."""
    if p == 1:
        return True
    if vpp > 1 and not interleaved_accepts(p, 2 * m, group_size):
        return False
    return y_sent_before_needed(p, vpp, m, group_size)


def one_call_deadlock_free(p: int, vpp: int, m: int, group_size: int | None = None) -> bool:
    """The weaker condition an explicit train.proseco_schedule=one_call accepts: the dataflow
    graph with the y edges completes. Non-interleaved that holds for every m, also with
    rendezvous sends: the last stage's forward of MDM micro-batch i needs the first stage only up
    to its send of micro-batch i's activations, which precedes its forward of SC micro-batch m+i;
    but with m < p the first stage may wait for y_i."""
    if p == 1:
        return True
    if vpp > 1 and not interleaved_accepts(p, 2 * m, group_size):
        return False
    return not simulate(p, vpp, 2 * m, group_size, y_offset=m).stuck
