"""megatron-core's real training path on CPU/gloo gives the same losses at every layout.

A tiny GPT (4 layers, hidden 32, 4 heads, vocab 64, seq 16, float32) is
trained for 2 steps on fixed data with megatron's DDP, optimizer (Adam, grad
clipping), LR scheduler and the schedule from ``get_forward_backward_func()``
at several (TP, PP, VPP, DP) layouts, each launched with torchrun. The weights
come from ``init_weights_layout_independent`` so every layout starts from the
same network; the per-step losses and grad norms must then agree with TP1/PP1
up to float32 round-off.

Tolerance: layouts compute the same sums in a different order (TP splits
each matmul reduction and the vocab softmax into per-rank partial sums that
are all-reduced; the grad norm is summed over ranks), so results agree only
up to float32 round-off: unit round-off 6e-8, amplified by sums of at most a
few hundred terms. One Adam step keeps that scale (its first update is about
lr * sign(grad), insensitive to tiny grad changes). Observed: losses agree
bit for bit, grad norms within 1.5e-7 relative. rtol=1e-5 leaves a wide
margin and still catches real errors (a wrong shard, a missing all-reduce, a
layer initialised differently): without layout-independent init, PP2's
step-1 loss differs from PP1's by 3e-5 relative and its grad norm by 7%.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import run_distributed

THIS_FILE = str(Path(__file__).resolve())
SEQ, VOCAB, MICRO_BATCH, NUM_MICRO_BATCHES, STEPS = 16, 64, 2, 4, 2
RTOL = 1e-5


# --------------------------------------------------------------------------
# worker side (runs under torchrun, one call per rank)
# --------------------------------------------------------------------------
def _fixed_batches(dp_rank: int, dp_size: int):
    """Per step, this data-parallel rank's micro-batches of a fixed global batch."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (STEPS, NUM_MICRO_BATCHES, MICRO_BATCH, SEQ + 1),
                           generator=generator)
    per_rank = NUM_MICRO_BATCHES // dp_size
    positions = torch.arange(SEQ).unsqueeze(0).expand(MICRO_BATCH, SEQ)
    for step_tokens in tokens:
        mine = step_tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        yield [{"tokens": t[:, :-1], "labels": t[:, 1:], "position_ids": positions} for t in mine]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        # clone: the schedule divides the returned loss in place by num_microbatches
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def _build_model_chunks(tp: int, pp: int, vpp: int | None):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        # Megatron-LM's setting for interleaving. megatron-core's default (batched p2p)
        # silently swaps activations and grads at PP=2 + VPP, where the previous and next
        # stage are the same rank (Megatron-LM issues #750, #1450).
        batch_p2p_comm=vpp is None, overlap_p2p_comm=vpp is not None,
    )
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunks.append(GPTModel(
            config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
            pre_process=first, post_process=last, share_embeddings_and_output_weights=True,
            vp_stage=vp_stage,
        ))
    return config, chunks


def train_worker(tp: str, pp: str, vpp: str, out_path: str) -> None:
    """Train 2 steps at the given layout; the reporting rank writes losses/grad norms as JSON."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from prosec_mcore.runtime import (destroy_distributed, init_weights_layout_independent,
                                      initialize_distributed)

    tp, pp, vpp = int(tp), int(pp), (int(vpp) or None)
    initialize_distributed(tp=tp, pp=pp, vpp=vpp, seed=1234)
    config, chunks = _build_model_chunks(tp, pp, vpp)
    init_weights_layout_independent(chunks, seed=42)

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=False)
    model = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    config.no_sync_func = [m.no_sync for m in model] if vpp else model[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, use_distributed_optimizer=False,
                        clip_grad=1.0),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=1e-2, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=0, lr_decay_steps=10,
        lr_decay_style="cosine", start_wd=0.0, end_wd=0.0, wd_incr_steps=10,
        wd_incr_style="constant",
    )

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_micro = NUM_MICRO_BATCHES // dp_size
    last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    reporter = last_stage and parallel_state.get_tensor_model_parallel_rank() == 0 and dp_rank == 0
    losses, grad_norms = [], []
    for micro_batches in _fixed_batches(dp_rank, dp_size):
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        iterators = [iter(micro_batches) for _ in model]
        stats = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iterators if vpp else iterators[0],
            model=model if vpp else model[0],
            num_microbatches=num_micro, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        if last_stage:  # the schedule returns the loss only on the last stage
            loss = torch.stack([s["lm loss"] for s in stats]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append(loss.item() / dp_size)
            grad_norms.append(float(grad_norm))

    if reporter:
        Path(out_path).write_text(json.dumps({"losses": losses, "grad_norms": grad_norms}))
    destroy_distributed()


def rng_worker() -> None:
    """Single process, no torchrun: the CPU RNG tracker and activation recompute."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from prosec_mcore.runtime import (apply_cpu_compat, describe_cpu_compat, destroy_distributed,
                                      initialize_distributed)

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)

    # apply_cpu_compat refuses a megatron-core version it was not written for ...
    from megatron.core import package_info

    real_version, package_info.__version__ = package_info.__version__, "0.0.0"
    try:
        apply_cpu_compat()
        raise AssertionError("apply_cpu_compat accepted megatron-core 0.0.0")
    except RuntimeError as error:
        assert "0.16.1" in str(error) and "0.0.0" in str(error)
    finally:
        package_info.__version__ = real_version

    # ... and is idempotent (initialize_distributed applies it a second time).
    patches = apply_cpu_compat()
    initialize_distributed(tp=1, pp=1, seed=1234)
    assert describe_cpu_compat() == patches
    assert any(p.startswith("cpu-rng-tracker") for p in patches)
    tracker = get_cuda_rng_tracker()

    # A fork draws from its own stream and leaves the default generator alone.
    default_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), default_before), "fork changed the default stream"
    with tracker.fork():
        second = torch.rand(4)
    # Two forks continue one stream: megatron seeds the TP stream with seed + 2718 + tp_rank.
    expected = torch.rand(8, generator=torch.Generator().manual_seed(1234 + 2718))
    assert torch.equal(torch.cat([first, second]), expected), "forks do not continue one stream"
    with tracker.fork(tensor_parallel.random.get_data_parallel_rng_tracker_name()):
        with tracker.fork():  # nested: the inner stream still continues where it stopped
            third = torch.rand(4)
    assert torch.equal(third, torch.rand(12, generator=torch.Generator().manual_seed(3952))[8:])

    # Activation recompute replays the same dropout mask from the saved RNG states.
    def dropout_in_fork(x):
        with get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, p=0.5, training=True)

    x = torch.ones(64, requires_grad=True)
    y = tensor_parallel.checkpoint(dropout_in_fork, False, x)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach()), "recomputed dropout mask differs from the forward one"

    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not warnings, f"megatron RNG warnings: {warnings}"
    destroy_distributed()
    print("RNG_WORKER_OK")


# --------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------
LAYOUTS = {  # name: (tp, pp, vpp, nproc)
    "tp1_pp1": (1, 1, 0, 1),
    "tp2_pp1": (2, 1, 0, 2),
    "tp1_pp2": (1, 2, 0, 2),
    "tp2_pp2": (2, 2, 0, 4),
    "tp1_pp2_vpp2": (1, 2, 2, 2),
    "dp2": (1, 1, 0, 2),
}


@pytest.fixture(scope="module")
def layout_results(tmp_path_factory):
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            tp, pp, vpp, nproc = LAYOUTS[name]
            out = tmp_path_factory.mktemp(name) / "result.json"
            run_distributed(f"{THIS_FILE}:train_worker", nproc, [tp, pp, vpp, out], timeout=120)
            cache[name] = json.loads(out.read_text())
        return cache[name]

    return get


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1_pp1"])
def test_layout_matches_tp1_pp1(layout, layout_results):
    reference, result = layout_results("tp1_pp1"), layout_results(layout)
    assert len(result["losses"]) == STEPS
    for step in range(STEPS):
        assert result["losses"][step] == pytest.approx(reference["losses"][step], rel=RTOL), step
        assert result["grad_norms"][step] == pytest.approx(reference["grad_norms"][step], rel=RTOL)
    # The step must have changed the model, or equal losses would prove nothing.
    assert abs(reference["losses"][1] - reference["losses"][0]) > 1e-3


def test_rng_tracker_forks_separate_cpu_stream():
    output = run_distributed(f"{THIS_FILE}:rng_worker", nproc=None, timeout=60)
    assert "RNG_WORKER_OK" in output


def test_layout_validation_is_one_clear_line():
    from prosec_mcore.runtime.distributed import validate_layout

    with pytest.raises(ValueError, match="not divisible by tp\\*pp"):
        validate_layout(world_size=4, tp=3, pp=1, vpp=None)
    with pytest.raises(ValueError, match="needs pipeline parallel size > 1"):
        validate_layout(world_size=2, tp=2, pp=1, vpp=2)
