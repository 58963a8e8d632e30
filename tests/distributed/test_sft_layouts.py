"""The SFT objective gives the same loss and gradients at every parallel layout.

ONE torchrun launch of 4 processes (`compare_layouts` below runs on every rank; megatron's groups
are torn down and rebuilt between layouts, as tests/distributed/one_call_worker.py does). The
same tiny model, at the project's generic point (every parameter perturbed, adaLN gates included:
tests/compare.py), and the same global batch of 8 SFT examples (prompts of 3 to 12 tokens,
responses of different lengths, EOS padding; objective.sft_pad_in_loss=false, so both masks
matter) go through one training step at

    tp1      TP=1 PP=1 (DP=4): the reference
    tp2      TP=2 (DP=2): vocab-parallel cross-entropy and argmax
    pp2      PP=2 (DP=2), the two-call schedule: the prompt mask travels with each micro-batch to
             both stages and both passes, y is broadcast from the last stage
    pp2_one  PP=2 (DP=2), the one-call schedule: y_i (x at the prompt) is sent to the first stage
             (ProSeCo only: MDLM runs one pass whatever the schedule mode)

for both objectives, and each rank compares its gradients (per parameter, by global name, sliced
as tensor parallelism splits them) and every reported metric with the reference's.

Tolerances, from measured float32 round-off (layouts differ only in reduction order): gradients,
max |g - g_ref| / max |g_ref| per tensor, at most 5.0e-7 over all layouts and both objectives
(GRAD_RTOL 1e-5, as tests/distributed/test_prosec_layouts.py); metrics at most 5.7e-8 relative
(METRIC_RTOL 2e-6). Bugs this test caught when injected (worst relative gradient difference):
the prompt kept clean on the last pipeline stage only (the first stage's z_t masks the prompt),
2.0e-1 at pp2 (MDLM; 7.9e-3 ProSeCo); the one-call send carrying y without the prompt restored
(the last stage's own copy right), 2.2e-1 at pp2_one.
"""
import json
import os

from tests.distributed.launch import run_distributed

GRAD_RTOL = 1e-5
METRIC_RTOL = 2e-6
VOCAB = 61  # ids 0..58 tokens, 59 EOS, 60 the mask
EOS, MASK_ID = 59, 60
SEQ, MICRO, GLOBAL = 32, 2, 8
LAYOUTS = [("tp1", 1, 1, "two_call"), ("tp2", 2, 1, "two_call"), ("pp2", 1, 2, "two_call"),
           ("pp2_one", 1, 2, "one_call")]
METRICS = ("loss", "mdm_loss", "sc_loss", "corrector_nll", "mask_fraction", "denoiser_accuracy",
           "corrector_input_error_rate", "response_fraction")


def _global_batch():
    """8 SFT examples: random tokens, a prompt of 3..12 tokens, a response, its EOS, EOS padding."""
    import torch

    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, EOS, (GLOBAL, SEQ), generator=gen)
    prompt = torch.zeros(GLOBAL, SEQ, dtype=torch.bool)
    pad = torch.zeros(GLOBAL, SEQ, dtype=torch.bool)
    for i in range(GLOBAL):
        p_len = 3 + (5 * i) % 10
        end = min(SEQ, p_len + 4 + (7 * i) % 16)  # the response's EOS sits at `end - 1`
        prompt[i, :p_len] = True
        tokens[i, end - 1:] = EOS
        pad[i, end:] = True
    return tokens, prompt, pad


def _microbatches(dp_rank, dp_size):
    import torch

    tokens, prompt, pad = _global_batch()
    per_rank = GLOBAL // dp_size
    mbs = []
    for j in range(per_rank // MICRO):
        first = dp_rank * per_rank + j * MICRO
        pos = torch.arange(first, first + MICRO)
        rows = slice(first, first + MICRO)
        mbs.append({"tokens": tokens[rows], "prompt_mask": prompt[rows], "pad_mask": pad[rows],
                    "sample_index": 900 + pos, "batch_position": pos, "global_batch_index": torch.full((MICRO,), 2)})
    return mbs


def _objectives(mode):
    return ("proseco",) if mode == "one_call" else ("proseco", "mdlm")


def _run_layout(tp, pp, mode):
    """(metrics, [(global name, parameter, main_grad)], plan) per objective for one layout."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.diffusion.losses import LossOptions
    from prosec_mcore.diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME
    from prosec_mcore.diffusion.schedules import build_schedule
    from prosec_mcore.diffusion.sft import SFTSettings
    from prosec_mcore.model.builder import build_model_chunks
    from prosec_mcore.runtime.init import global_parameter_names, init_weights_layout_independent
    from prosec_mcore.training.optim import wrap_ddp
    from prosec_mcore.training.step import NoiseSettings, ProSeCoStep
    from tests.compare import set_generic_point_distributed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    cfg = load_config(["model=tiny", "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
                       "model.time_embedding_dim=32", f"parallel.tp={tp}", f"parallel.pp={pp}",
                       f"data.seq_length={SEQ}"])
    chunks = build_model_chunks(cfg, VOCAB, random_init=False)
    init_weights_layout_independent(chunks, seed=1)  # every layout starts from the TP1/PP1 weights
    set_generic_point_distributed(chunks, seed=7)
    config = chunks[0].config
    chunks = wrap_ddp(chunks, config, cfg.parallel)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = chunks[0].no_sync
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    noise = NoiseSettings(seed=5, eps=1e-3, antithetic=True, global_batch_size=GLOBAL,
                          time_stream=STREAM_TRAIN_TIME, mask_stream=STREAM_TRAIN_MASK)
    opts = LossOptions(lambda_mdm=0.8, lambda_sc=1.2, errors_upweighted=True, sft=SFTSettings("response", False))
    out = {}
    for objective in _objectives(mode):
        step = ProSeCoStep(chunks, config, objective, opts, build_schedule("loglinear"), MASK_ID, VOCAB, SEQ, MICRO,
                           schedule_mode=mode)
        for chunk in chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        metrics = step.run(_microbatches(dp_rank, dp_size), noise)
        grads = [(n, p, p.main_grad.detach().clone()) for c in chunks
                 for n, p in global_parameter_names(c.module).items()]
        out[objective] = (metrics, grads, step.describe_schedule(GLOBAL // (MICRO * dp_size)))
    return out


def compare_layouts(out_dir):
    """Every rank: run each layout, compare with the tp1 run, write <out_dir>/rank<r>.json."""
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch
    from megatron.core import parallel_state

    from prosec_mcore.runtime import initialize_distributed
    from prosec_mcore.runtime.init import tp_slice

    initialize_distributed(tp=1, pp=1, seed=1234)
    reference, results = None, {}
    for name, tp, pp, mode in LAYOUTS:
        runs = _run_layout(tp, pp, mode)
        if reference is None:  # tp1: every rank holds the whole, DP-reduced gradients
            reference = {obj: (m, {n: g for n, _, g in grads}) for obj, (m, grads, _) in runs.items()}
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for objective, (metrics, grads, plan) in runs.items():
            ref_metrics, ref_grads = reference[objective]
            diffs = {}
            for param_name, param, g in grads:
                expected = tp_slice(ref_grads[param_name], param, tp_rank, tp)
                scale = expected.abs().max().item() or 1.0
                diffs[param_name] = (g - expected).abs().max().item() / scale
            results[f"{name}/{objective}"] = {
                "grads": diffs, "plan": plan, "compared": len(diffs), "reference_tensors": len(ref_grads),
                "nonzero": sum(int(g.abs().sum() > 0) for _, _, g in grads),
                "metrics": {k: abs(metrics[k] - ref_metrics[k]) / max(abs(ref_metrics[k]), 1e-12) for k in METRICS},
                "sc_loss": metrics["sc_loss"],
            }
    with open(os.path.join(out_dir, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(results, f)


def test_sft_loss_and_gradients_equal_at_every_layout(tmp_path):
    run_distributed("tests/distributed/test_sft_layouts.py:compare_layouts", nproc=4, args=[str(tmp_path)],
                    timeout=240)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(4)]
    for name, tp, pp, mode in LAYOUTS[1:]:
        for objective in _objectives(mode):
            case = f"{name}/{objective}"
            for rank, results in enumerate(ranks):
                r = results[case]
                if objective == "proseco":
                    want = "one call" if mode == "one_call" else "two calls"
                    assert r["plan"].startswith(f"proseco schedule: {want}"), (case, r["plan"])
                    assert r["sc_loss"] > 0, case
                assert r["nonzero"] > r["compared"] // 2, (case, rank)  # the gradients carry signal
                param, worst = max(r["grads"].items(), key=lambda kv: kv[1])
                assert worst < GRAD_RTOL, f"{case} rank {rank}: gradient of {param} differs by {worst:.2e} (relative)"
                key, worst = max(r["metrics"].items(), key=lambda kv: kv[1])
                assert worst < METRIC_RTOL, f"{case} rank {rank}: metric {key} differs by {worst:.2e} (relative)"
    # every parameter is compared somewhere: across a pipeline's stages the names cover the reference
    for name, tp, pp, mode in LAYOUTS[1:]:
        seen = set().union(*(ranks[r][f"{name}/proseco"]["grads"] for r in range(4)))
        assert len(seen) == ranks[0][f"{name}/proseco"]["reference_tensors"], name
