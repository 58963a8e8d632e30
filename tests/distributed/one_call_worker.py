"""Runs on every rank of tests/distributed/test_one_call_schedule.py: for several parallel layouts
in ONE launch (megatron's groups are torn down and rebuilt between layouts), the same model and
global batch go through a ProSeCo training step twice, once with schedule_mode="two_call" and once
with "one_call", and the worker records how far apart the two are:

* the gradients before any optimizer (DDP's main_grad, after megatron's finalisation), per
  parameter as max |g_one - g_two| / max |g_two|;
* every reported metric (loss terms, accuracies), relative;
* how the one-call step ran: the plan it chose and its timing laps (one `joint_pass`).

    compare_schedules(cases_json, out_dir)
      cases_json: [[name, tp, pp, vpp, num_microbatches], ...]; writes <out_dir>/rank<r>.json
"""
import json
import os

VOCAB = 61
SEQ, MICRO = 32, 2
OBJECTIVES = ("proseco", "mdlm")


def _microbatches(num_micro, dp_rank, dp_size, batch_index=3):
    """This data-parallel rank's micro-batches of one global batch of random tokens (ids < VOCAB-1)."""
    import torch

    gen = torch.Generator().manual_seed(11)
    samples = num_micro * MICRO * dp_size
    tokens = torch.randint(0, VOCAB - 1, (samples, SEQ), generator=gen)
    mbs = []
    for j in range(num_micro):
        first = (dp_rank * num_micro + j) * MICRO
        pos = torch.arange(first, first + MICRO)
        mbs.append({"tokens": tokens[first:first + MICRO], "sample_index": 500 + pos, "batch_position": pos,
                    "global_batch_index": torch.full((MICRO,), batch_index)})
    return mbs


def _build(tp, pp, vpp):
    """The tiny model of this layout at the project's generic point, wrapped in megatron's DDP."""
    from megatron.core.distributed import finalize_model_grads

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.model.builder import build_model_chunks
    from prosec_mcore.training.optim import wrap_ddp
    from tests.compare import set_generic_point_distributed

    cfg = load_config(["model=tiny", f"parallel.tp={tp}", f"parallel.pp={pp}", f"data.seq_length={SEQ}"]
                      + ([f"parallel.vpp={vpp}"] if vpp else []))
    chunks = build_model_chunks(cfg, VOCAB)
    set_generic_point_distributed(chunks, seed=7)
    config = chunks[0].config
    chunks = wrap_ddp(chunks, config, cfg.parallel)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = chunks[0].no_sync if len(chunks) == 1 else [c.no_sync for c in chunks]
    return chunks, config


def _run_case(name, tp, pp, vpp, num_micro):
    import torch
    from megatron.core import parallel_state

    from prosec_mcore.diffusion.losses import LossOptions
    from prosec_mcore.diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME
    from prosec_mcore.diffusion.schedules import build_schedule
    from prosec_mcore.runtime.init import global_parameter_names
    from prosec_mcore.training.step import NoiseSettings, ProSeCoStep

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp)
    chunks, config = _build(tp, pp, vpp)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    microbatches = _microbatches(num_micro, dp_rank, dp_size)
    noise = NoiseSettings(seed=5, eps=1e-3, antithetic=True, global_batch_size=num_micro * MICRO * dp_size,
                          time_stream=STREAM_TRAIN_TIME, mask_stream=STREAM_TRAIN_MASK)
    opts = LossOptions(lambda_mdm=0.8, lambda_sc=1.2, errors_upweighted=True)
    out = {}
    for objective in OBJECTIVES:
        runs = {}
        for mode in ("two_call", "one_call"):
            step = ProSeCoStep(chunks, config, objective, opts, build_schedule("loglinear"), VOCAB - 1, VOCAB - 1,
                               SEQ, MICRO, schedule_mode=mode)
            step.time_phases = True
            for chunk in chunks:
                chunk.train()
                chunk.zero_grad_buffer()
            metrics = step.run(microbatches, noise)
            grads = [(n, p.main_grad.detach().clone()) for c in chunks
                     for n, p in global_parameter_names(c.module).items()]
            runs[mode] = (metrics, grads, sorted(step.last_timings), step.describe_schedule(num_micro))
        (m2, g2, _, _), (m1, g1, laps, plan) = runs["two_call"], runs["one_call"]
        grad_diff = {}
        for (param, a), (_, b) in zip(g1, g2):  # a name seen twice (the time embedder per chunk) keeps the worst
            scale = b.abs().max().item() or 1.0
            grad_diff[param] = max(grad_diff.get(param, 0.0), (a - b).abs().max().item() / scale)
        metric_diff = {k: abs(m1[k] - m2[k]) / max(abs(m2[k]), 1e-12) for k in m2}
        out[f"{name}/{objective}"] = {"grads": grad_diff, "metrics": metric_diff, "laps": laps, "plan": plan,
                                      "grad_nonzero": sum(int(b.abs().sum() > 0) for _, b in g2), "grad_tensors": len(g2),
                                      "sc_loss": m2["sc_loss"]}
    return out


def compare_schedules(cases_json, out_dir):
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch

    from prosec_mcore.runtime import initialize_distributed

    cases = json.loads(cases_json)
    initialize_distributed(tp=1, pp=1, seed=1234)
    results = {}
    for name, tp, pp, vpp, num_micro in cases:
        results.update(_run_case(name, tp, pp, vpp, num_micro))
    with open(os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(results, f)
