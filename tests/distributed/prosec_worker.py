"""Runs on every rank of a distributed test: train a few steps, then record what to compare.

    train_and_record(overrides_json, out_dir, mode)
      mode "save":    (the TP=1 PP=1 reference) save every parameter, by global name
      mode <path>:    compare this rank's parameter shards with the reference saved at <path>,
                      sliced exactly as tensor parallelism splits them, and write the largest
                      relative difference of each tensor to <out_dir>/diff_rank<r>.json
The per-step metrics come from <run_dir>/metrics.jsonl, written by rank 0.
"""
import json
import os


def train_and_record(overrides_json, out_dir, mode):
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch
    from megatron.core import parallel_state

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.runtime.init import _tp_slice, global_parameter_names
    from prosec_mcore.training.trainer import Trainer

    trainer = Trainer(load_config(json.loads(overrides_json)))
    trainer.train()
    # Every chunk of this rank (several with the interleaved pipeline); layer names are global.
    params = [item for chunk in trainer.model for item in global_parameter_names(chunk.module).items()]
    rank = torch.distributed.get_rank()
    if mode == "save":
        torch.save({name: p.detach().clone() for name, p in params}, os.path.join(out_dir, "weights.pt"))
        return
    reference = torch.load(mode)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    diffs = {}
    for name, p in params:  # a name seen twice (the time embedder of each chunk) keeps the worst
        expected = _tp_slice(reference[name], p, tp_rank, tp_size)
        scale = expected.abs().max().item() or 1.0
        diffs[name] = max(diffs.get(name, 0.0), (p.detach() - expected).abs().max().item() / scale)
    with open(os.path.join(out_dir, f"diff_rank{rank}.json"), "w") as f:
        json.dump(diffs, f)
