"""A ProSeCo step in ONE megatron-core schedule call equals the two-call step (training/one_call.py).

Distributed part: one torchrun launch per world size runs several layouts (one_call_worker.py);
for each, the same model and global batch go through the step with schedule_mode="two_call" and
"one_call", and we compare the gradients before the optimizer (after megatron's finalisation: DP
reduction, the pipeline sum of the time-embedder copies) and every reported metric. Layouts: PP2,
PP2xVPP2 (interleaved) on 2 processes; PP4, TP2xPP2, PP2xDP2 and PP4 with m=2 < p (an explicit
one_call: the first stage waits for y) on 4; both objectives (mdlm runs one pass whatever the
mode: it must be untouched).

Tolerances, measured (fp32, CPU, model=tiny, this file's settings): gradients and metrics agree
bitwise (max relative difference 0.0 in every layout): each stage runs its backwards in the same
micro-batch order in both modes, and scaling a loss by 2 before megatron divides it by 2m is exact.
GRAD_RTOL = METRIC_RTOL = 1e-6 leave room for a change of reduction order only; the bugs these
tests guard against are far larger (measured at PP2, worst tensor): the MDM loss not scaled by 2
in one call, 2.6e-1; the first stage given y of the previous micro-batch, 6.1e-1; the one call
run without DDP sync and `finalize_model_grads` (the two-call step's pass-1 setting), 9.7e-1 on
the time embedder, whose pipeline copies are no longer summed.

Schedule part (no processes): the one-call condition of training/pipeline_order.py against
megatron-core's own schedule order, the plan's choices and errors, and the timeline model.
"""
import json
import os

import pytest

from launch import run_distributed

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "one_call_worker.py") + ":compare_schedules"
GRAD_RTOL = 1e-6
METRIC_RTOL = 1e-6

LAUNCHES = {  # world size: [(name, tp, pp, vpp, micro-batches per rank)]
    2: [("pp2", 1, 2, None, 2), ("pp2_vpp2", 1, 2, 2, 4)],
    # pp4_m2: m < p, which "auto" leaves to two calls; the worker's explicit one_call runs it.
    4: [("pp4", 1, 4, None, 4), ("tp2_pp2", 2, 2, None, 2), ("pp2_dp2", 1, 2, None, 2), ("pp4_m2", 1, 4, None, 2)],
}


@pytest.fixture(scope="module", params=sorted(LAUNCHES), ids=lambda n: f"world{n}")
def launch(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"one_call_world{world}")
    run_distributed(WORKER, nproc=world, args=[json.dumps(LAUNCHES[world]), str(out)], timeout=240)
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(world)]
    return world, ranks


def test_one_call_equals_two_call(launch):
    world, ranks = launch
    for name, *_ in LAUNCHES[world]:
        for objective in ("proseco", "mdlm"):
            case = f"{name}/{objective}"
            for rank, results in enumerate(ranks):
                r = results[case]
                if objective == "proseco":
                    assert r["plan"].startswith("proseco schedule: one call"), (case, r["plan"])
                    assert r["laps"] == ["joint_pass", "noise"], (case, r["laps"])  # one schedule call ran
                    assert r["sc_loss"] > 0, case
                else:
                    assert r["laps"] == ["mdm_pass", "noise"], (case, r["laps"])
                assert r["grad_nonzero"] > r["grad_tensors"] // 2, (case, rank)  # the gradients carry signal
                param, worst = max(r["grads"].items(), key=lambda kv: kv[1])
                assert worst < GRAD_RTOL, f"{case} rank {rank}: gradient of {param} differs by {worst:.2e} (relative)"
                key, worst = max(r["metrics"].items(), key=lambda kv: kv[1])
                assert worst < METRIC_RTOL, f"{case} rank {rank}: metric {key} differs by {worst:.2e} (relative)"
                if objective == "mdlm":
                    assert max(r["grads"].values()) == 0.0 and max(r["metrics"].values()) == 0.0, case


# ------------------------------------------------------------------ the schedule condition
def test_non_interleaved_condition_is_m_at_least_p():
    """The simulated guarantee (megatron's order: y_i sent before the first stage needs it) is
    exactly m >= p for the plain 1F1B schedule, as the docstring of pipeline_order.py derives."""
    from prosec_mcore.training.pipeline_order import simulate, y_sent_before_needed

    for p in range(2, 7):
        for m in range(1, 2 * p + 2):
            assert y_sent_before_needed(p, 1, m) == (m >= p), (p, m)
            assert not simulate(p, 1, 2 * m, y_offset=m).stuck, (p, m)  # dataflow: never a cycle


def test_interleaved_condition():
    """Interleaved with megatron's default group size (p): guaranteed from m = 2p on, not at m = p;
    the y edges never make the dataflow graph cyclic."""
    from prosec_mcore.training.pipeline_order import simulate, y_sent_before_needed

    for p in (2, 3, 4):
        for vpp in (2, 4):
            assert not y_sent_before_needed(p, vpp, p), (p, vpp)
            for m in (2 * p, 3 * p, 4 * p):
                assert y_sent_before_needed(p, vpp, m), (p, vpp, m)
                assert not simulate(p, vpp, 2 * m, y_offset=m).stuck
    # megatron refuses 2m = 10 micro-batches in groups of 3 at PP2 (remainder 1 < PP) although it
    # takes m = 5 (remainder 2): the step must then keep two calls.
    from prosec_mcore.training.pipeline_order import one_call_guaranteed

    assert y_sent_before_needed(2, 2, 5, 3) and not one_call_guaranteed(2, 2, 5, 3)


def test_rank_order_follows_megatron_warmup():
    """Each rank runs every forward and backward once; warm-up forwards as megatron counts them."""
    from prosec_mcore.training.pipeline_order import rank_order

    order = rank_order(4, 0, 1, 8)
    assert [s[0] for s in order[:4]] == ["F", "F", "F", "F"] and order[4][0] == "B"  # 3 warm-up + first 1F1B
    inter = rank_order(2, 0, 2, 4)  # warm-up 2*(p-1-r) + (vpp-1)*p = 4
    assert [s[0] for s in inter[:5]] == ["F"] * 5 and inter[5] == ("B", 0, 2)  # chunk 1 = virtual stage 2
    assert sorted(inter) == sorted([(k, mb, s) for k in "FB" for mb in range(4) for s in (0, 2)])


def test_plan_choices_and_errors():
    from prosec_mcore.training.one_call import plan_schedule

    assert plan_schedule("auto", 1, 1, 1).one_call  # nothing travels at PP=1
    assert plan_schedule("auto", 4, 1, 4).one_call
    fallback = plan_schedule("auto", 4, 1, 3)
    assert not fallback.one_call and "m >= pp" in fallback.description
    assert not plan_schedule("two_call", 4, 1, 8).one_call
    forced = plan_schedule("one_call", 4, 1, 3)  # deadlock-free, not guaranteed: runs, may wait for y
    assert forced.one_call and "may wait" in forced.description
    with pytest.raises(ValueError, match="train.proseco_schedule=one_call"):
        plan_schedule("one_call", 2, 2, 5, 3)  # megatron refuses 10 micro-batches in groups of 3 at PP2
    with pytest.raises(ValueError, match="train.proseco_schedule='three'"):
        plan_schedule("three", 2, 1, 2)


def test_timeline_one_call_saves_one_fill_and_drain():
    """Timeline model: one call of 2m micro-batches vs two calls of m (f=1, b=2, no latency):
    the saving is one fill/drain, (p-1)(f+b), exactly, in the plain 1F1B schedule."""
    from prosec_mcore.training.pipeline_order import simulate

    for p in (2, 4, 8):
        for m in (p, 2 * p):
            two = 2 * simulate(p, 1, m).makespan
            one = simulate(p, 1, 2 * m, y_offset=m).makespan
            assert two - one == pytest.approx((p - 1) * 3.0), (p, m)
