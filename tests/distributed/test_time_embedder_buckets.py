"""The pipeline-shared time embedder under the distributed optimizer: its gradient shards line up
on every pipeline stage.

Every pipeline stage holds a copy of the timestep embedder, and megatron-core's
finalize_model_grads sums the copies' gradients over the pipeline group
(`_allreduce_conditional_embedding_grads`, enabled by config.has_cond_embedder for parameters
marked `pipeline_parallel`). With the distributed optimizer that sum runs *after* the data-parallel
reduce-scatter, when each rank's gradient buffer is valid only on its own shard: the sum is right
only if every stage shards these parameters identically. The model marks them `shared_embedding`,
which makes megatron's param_and_grad_buffer put each in a bucket of its own (padded alike), so
the shard boundaries cannot depend on what else a stage holds. megatron's DDP buffers build on
CPU, so the layout is checked here on 4 ranks (PP=2 x DP=2) with the distributed optimizer's
bucketing; the optimizer itself is CUDA-only.
"""
import os

from tests.distributed.launch import run_distributed


def bucket_worker(prepare_dir: str, out_dir: str) -> None:
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.model.builder import build_model_chunks
    from prosec_mcore.runtime import initialize_distributed

    cfg = load_config([f"data.prepare_dir={prepare_dir}", "parallel.pp=2", "model.num_layers=2"])
    initialize_distributed(tp=1, pp=2, seed=1)
    chunks = build_model_chunks(cfg, 1024)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                               bucket_size=10**9)
    model = DistributedDataParallel(config=chunks[0].config, ddp_config=ddp_config, module=chunks[0])
    assert chunks[0].config.has_cond_embedder
    dp = parallel_state.get_data_parallel_world_size()
    name_of = {p: n for n, p in chunks[0].named_parameters()}
    layout = {}
    for buffer in model.buffers:
        for bucket in buffer.buckets:
            embedder = [p for p in bucket.params_list if getattr(p, "pipeline_parallel", False)]
            if not embedder:
                continue
            assert len(bucket.params_list) == 1, "a time-embedder parameter shares its bucket"
            (param,) = embedder
            start, end, _ = buffer.param_index_map[param]
            size = bucket.grad_data.numel()
            assert size % dp == 0
            shard = size // dp
            layout[name_of[param]] = (start - bucket.offset, end - bucket.offset, size,
                                          [(r * shard, (r + 1) * shard) for r in range(dp)])
    names = sorted(n for n, p in chunks[0].named_parameters() if getattr(p, "pipeline_parallel", False))
    assert sorted(layout) == names and len(names) == 4, (names, layout)  # fc1/fc2 weight and bias
    gathered = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(gathered, sorted(layout.items()),
                                        group=parallel_state.get_pipeline_model_parallel_group())
    assert gathered[0] == gathered[1], "the pipeline stages shard the time embedder differently"
    with open(os.path.join(out_dir, f"ok_rank{torch.distributed.get_rank()}"), "w") as f:
        f.write(repr(gathered[0]))


def test_time_embedder_shards_line_up_across_pipeline_stages(tmp_path, shakespeare_corpus):
    prepare_dir = shakespeare_corpus[0].split("=", 1)[1]
    run_distributed("tests/distributed/test_time_embedder_buckets.py:bucket_worker", nproc=4,
                    args=[prepare_dir, str(tmp_path)], timeout=240)
    assert sorted(os.listdir(tmp_path)) == [f"ok_rank{r}" for r in range(4)]
