"""Shard-only initialisation (runtime/shard_draw.py, runtime/init.py) and models built without
megatron's random init (model/builder.py: random_init=False).

Every comparison is bitwise (torch.equal): the shard-only draw must reproduce the full draw's
float32 values exactly, not approximately. The references are independent of the new code:
megatron-core's own CPU master-weight initialisation (`_initialize_affine_weight_cpu`, which
draws the full tensor and keeps this rank's chunks) for single weights, and the previous
whole-model algorithm (full draw of every matrix, then the TP slice; reimplemented below from the
helpers it used) for models.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from prosec_mcore.config import Config
from prosec_mcore.model.builder import build_model
from prosec_mcore.runtime import init as layout_init
from prosec_mcore.runtime import shard_draw
from prosec_mcore.runtime.shard_draw import draw_normal_shard, shard_pattern

THIS_FILE = str(Path(__file__).resolve())
STD = 0.02
NORMAL = functools.partial(torch.nn.init.normal_, mean=0.0, std=STD)


def megatron_shard(full_shape, dim, stride, rank, tp, seed, init_fn=NORMAL, dtype=torch.float32):
    """This rank's weight as megatron-core's CPU initialisation makes it: the full master weight
    drawn by `init_fn` from the default generator (seeded), split and sliced by megatron."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    per_partition = full_shape[dim] // tp
    weight = torch.empty(*[per_partition if d == dim else s for d, s in enumerate(full_shape)], dtype=dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _initialize_affine_weight_cpu(weight, full_shape[0], full_shape[1], per_partition, dim, init_fn, stride=stride,
                                      params_dtype=dtype, rank=rank, world_size=tp)
    return weight


# Shapes: under one block in a shard, not multiples of 16 (the recomputed tail), a tail that
# straddles shards, narrow and wide rows, and chunk sizes that cut rows and blocks.
SHAPES = [(4, 4), (2, 16), (16, 24), (40, 8), (8, 6), (96, 40), (24, 33), (48, 7), (128, 3), (5, 256)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim,stride", [(0, 1), (0, 2), (1, 1), (1, 2)])
@pytest.mark.parametrize("chunk", [16, 40, 1 << 22])
def test_shard_draw_equals_megatron_full_draw_slice(shape, dim, stride, chunk):
    if math.prod(shape) < 16:
        pytest.skip("under 16 elements normal_ draws per element: the caller takes the full draw")
    for tp in (1, 2, 4, 8):
        if shape[dim] % (tp * stride):
            continue
        for rank in range(tp):
            expected = megatron_shard(shape, dim, stride, rank, tp, seed=11)
            out = torch.full_like(expected, float("nan"))
            draw_normal_shard(out, shard_pattern(shape, dim, stride, rank, tp), 0.0, STD, seed=11, chunk_elements=chunk)
            assert torch.equal(out, expected), (shape, dim, stride, tp, rank, chunk)


def test_shard_draw_rounds_like_megatron_into_bf16_and_leaves_the_caller_rng_alone():
    shape, dim, stride, tp, rank = (72, 40), 1, 2, 2, 1
    expected = megatron_shard(shape, dim, stride, rank, tp, seed=5, dtype=torch.bfloat16)
    out = torch.empty_like(expected)
    before = torch.get_rng_state()
    draw_normal_shard(out, shard_pattern(shape, dim, stride, rank, tp), 0.0, STD, seed=5)
    assert torch.equal(out, expected)
    assert torch.equal(torch.get_rng_state(), before)


def test_shard_draw_of_a_3d_tensor_split_along_its_middle_dimension():
    shape, tp = (3, 8, 10), 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        full = torch.empty(shape).normal_(0.0, STD)
    for rank in range(tp):
        out = torch.empty(3, 2, 10)
        draw_normal_shard(out, shard_pattern(shape, 1, 1, rank, tp), 0.0, STD, seed=2, chunk_elements=24)
        assert torch.equal(out, full[:, 2 * rank:2 * rank + 2]), rank


def test_memory_stays_within_the_shard_and_one_chunk(monkeypatch):
    """No buffer of the full tensor's size: only chunks (plus a block on each side) are allocated."""
    shape, chunk, tp = (1024, 1000), 4096, 8
    sizes = []
    real_empty = torch.empty

    def recording_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        sizes.append(tensor.numel())
        return tensor

    for dim in (0, 1):  # long rows (read in chunks, others' rows skipped) and short ones (read in groups)
        expected = megatron_shard(shape, dim, 1, 3, tp, seed=4)
        out = torch.empty_like(expected)
        monkeypatch.setattr(torch, "empty", recording_empty)
        draw_normal_shard(out, shard_pattern(shape, dim, 1, 3, tp), 0.0, STD, seed=4, chunk_elements=chunk)
        monkeypatch.setattr(torch, "empty", real_empty)
        assert sizes and max(sizes) <= chunk + 2 * shard_draw.BLOCK, (dim, max(sizes))
        assert torch.equal(out, expected), dim
        sizes.clear()


def _split_param(shape, dim, stride, tp):
    param = torch.nn.Parameter(torch.empty(*[s // tp if d == dim else s for d, s in enumerate(shape)]))
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, stride
    return param


@pytest.mark.parametrize("init_fn,shape,how", [
    (NORMAL, (16, 8), "shard"),
    (functools.partial(torch.nn.init.normal_, mean=0.5, std=2.0), (16, 8), "shard"),
    (NORMAL, (2, 6), "full"),  # 12 elements: normal_'s per-element path
    (torch.nn.init.xavier_uniform_, (16, 8), "full"),  # not normal_: drawn in full, explicitly
    (functools.partial(torch.nn.init.normal_, std=STD, generator=None), (16, 8), "full"),
])
def test_draw_parameter_shards_normal_init_only(init_fn, shape, how):
    tp = 2
    for rank in range(tp):
        param = _split_param(shape, 0, 1, tp)
        assert layout_init.draw_parameter(param, init_fn, seed=9, tp_rank=rank, tp_size=tp) == how
        assert torch.equal(param.data, megatron_shard(shape, 0, 1, rank, tp, seed=9, init_fn=init_fn))


# ---------------------------------------------------------------- whole models
MODELS = {
    "dit_adaln_labels": dict(style="dit", time_conditioning="adaln", num_classes=3),
    "llama_none": dict(style="llama", time_conditioning="none"),
}


def _config(tp: int, **model) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, num_layers=2, hidden_size=32, num_attention_heads=4,
                                    ffn_hidden_size=48, time_embedding_dim=16, **model)
    cfg.parallel.tp = tp
    return cfg


def previous_init(model, seed: int, tp_rank: int, tp_size: int) -> None:
    """The algorithm before shard-only draws: decide by value (a constant parameter is left as it
    is), draw every other matrix in full, keep this rank's slice."""
    from prosec_mcore.runtime.init import _draw, _init_function, full_shape, global_parameter_names, name_seed, tp_slice

    with torch.no_grad():
        for name, param in global_parameter_names(model).items():
            if bool((param == param.flatten()[0]).all()):
                continue
            full = _draw(_init_function(model.config, name), full_shape(param, tp_size), name_seed(seed, name))
            param.copy_(tp_slice(full, param, tp_rank, tp_size))


TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def compare_builds(cfg, vocab: int, tp_rank: int, tp_size: int) -> list[str]:
    """Build `cfg` with megatron's random init + the previous init, and with random_init=False +
    the shard-only init; return what differs (empty: bitwise equal, same TP attributes)."""
    before = build_model(cfg, vocab, backend="local")
    previous_init(before, seed=3, tp_rank=tp_rank, tp_size=tp_size)
    after = build_model(cfg, vocab, backend="local", random_init=False)
    problems = []
    if after.config.perform_initialization:
        problems.append("random_init=False did not switch perform_initialization off")
    poisoned = {n for n, p in after.named_parameters() if bool(p.isnan().all())}
    drawn = {n for n, p in after.named_parameters() if layout_init.is_drawn(n, p)}
    if poisoned != drawn:
        problems.append(f"NaN before init: {sorted(poisoned ^ drawn)}")
    how = layout_init.init_weights_layout_independent([after], seed=3)
    if set(how.values()) != {"shard"}:
        problems.append(f"not drawn shard-only: {how}")
    reference = dict(before.named_parameters())
    for name, param in after.named_parameters():
        if not torch.equal(param, reference[name]):
            problems.append(f"{name} differs")
        for attribute in TP_ATTRIBUTES:
            if getattr(param, attribute, None) != getattr(reference[name], attribute, None):
                problems.append(f"{name}.{attribute}: {getattr(param, attribute, None)} != "
                                f"{getattr(reference[name], attribute, None)}")
    return problems


@pytest.mark.parametrize("model", sorted(MODELS))
def test_model_built_without_random_init_then_shard_init_equals_previous_init(single_process_world, model):
    assert compare_builds(_config(1, **MODELS[model]), 200, 0, 1) == []


def tp2_worker(out_dir: str) -> None:
    """Rank side of the TP2 test: both models, both builds; each rank writes its problems."""
    from megatron.core import parallel_state

    from prosec_mcore.runtime import destroy_distributed, initialize_distributed

    initialize_distributed(tp=2, pp=1, seed=1234)
    rank = parallel_state.get_tensor_model_parallel_rank()
    problems = {name: compare_builds(_config(2, **overrides), 200, rank, 2) for name, overrides in MODELS.items()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(problems))
    destroy_distributed()


def test_shard_init_at_tp2_equals_previous_init(tmp_path):
    from tests.distributed.launch import run_distributed

    run_distributed(f"{THIS_FILE}:tp2_worker", nproc=2, args=[str(tmp_path)], timeout=120)
    for rank in range(2):
        problems = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert problems == {name: [] for name in MODELS}, rank


def test_loading_a_checkpoint_builds_without_random_init_and_gives_the_saved_weights(single_process_world, tmp_path):
    from megatron.core import dist_checkpointing

    from prosec_mcore.config_loader import config_to_dict
    from prosec_mcore.training.checkpoint import checkpoint_name, layout, load_model_for_inference, mark_complete
    from tests.compare import set_generic_point

    cfg = _config(1, **MODELS["dit_adaln_labels"])
    model = build_model(cfg, 200)
    saved = set_generic_point(model)  # every parameter, vectors and zero-initialised ones included
    path = tmp_path / checkpoint_name(0)
    path.mkdir()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 0, "config": config_to_dict(cfg),
                             "vocab_size": 200, "layout": layout(), "model_only": True}, str(path))
    mark_complete(str(tmp_path), 0, {"layout": layout()})
    loaded, _, _, _ = load_model_for_inference(str(tmp_path))
    assert loaded.config.perform_initialization is False
    params = dict(loaded.named_parameters())
    assert set(params) == set(saved)
    for name, value in saved.items():
        assert torch.equal(params[name], value), name


def kernel_worker(capability: str) -> None:
    """Plain-process side of the kernel test: the shard draw under one CPU kernel of normal_."""
    if torch.backends.cpu.get_cpu_capability() != capability.upper():
        print("UNSUPPORTED")
        return
    for shape, dim, stride in [((96, 40), 0, 2), ((96, 40), 1, 2), ((24, 33), 1, 1), ((48, 7), 0, 1)]:
        for tp in (2, 4, 8):
            if shape[dim] % (tp * stride):
                continue
            for rank in range(tp):
                out = torch.empty_like(megatron_shard(shape, dim, stride, rank, tp, seed=3))
                draw_normal_shard(out, shard_pattern(shape, dim, stride, rank, tp), 0.0, STD, seed=3, chunk_elements=40)
                assert torch.equal(out, megatron_shard(shape, dim, stride, rank, tp, seed=3)), (shape, dim, tp, rank)
    print("EQUAL")


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_shard_draw_matches_under_each_normal_kernel(monkeypatch, capability):
    """normal_ has an AVX2 kernel and a scalar one (the AVX512 build uses the scalar code); the
    shard draw relies only on their common block structure, so it must match under both."""
    from tests.distributed.launch import run_distributed

    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    output = run_distributed(f"{THIS_FILE}:kernel_worker", nproc=None, args=[capability], timeout=120)
    if "UNSUPPORTED" in output:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    assert "EQUAL" in output
