"""Runs on every rank of a layout test: train a few steps from a generic point, recording the
gradients of the first step before the optimizer applies them.

    train_and_record(overrides_json, out_dir, mode)
      mode "save":    (the TP=1 PP=1 reference) save, by global parameter name, the gradients of
                      iteration 1, the weights and their EMA (train.ema_decay > 0) after the last
                      iteration, and the float64 norm of those gradients
      mode <path>:    compare this rank's gradient, weight and EMA shards with the reference saved at
                      <path>, sliced exactly as tensor parallelism splits them, and write the
                      largest relative difference of each tensor to <out_dir>/diff_rank<r>.json
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
    from prosec_mcore.runtime.init import global_parameter_names, tp_slice
    from prosec_mcore.training.trainer import Trainer
    from tests.compare import set_generic_point_distributed

    trainer = Trainer(load_config(json.loads(overrides_json)))
    set_generic_point_distributed(trainer.model, seed=7)  # every block matters from step 1
    trainer.optimizer.reload_model_params()  # fp32 main copies, when the optimizer keeps any
    if trainer.ema is not None:
        trainer.ema.reset()  # the average starts at the generic point too

    def named(gradients: bool):
        """(global name, tensor) of this rank's parameters or their gradients (several chunks with
        the interleaved pipeline, so the time embedder may appear once per chunk)."""
        return [(name, (p.main_grad if gradients else p).detach().clone())
                for chunk in trainer.model for name, p in global_parameter_names(chunk.module).items()]

    grads = []

    def record_first_gradients(_, iteration):
        if iteration == 1:
            grads.extend(named(gradients=True))

    trainer.add_gradient_hook(record_first_gradients)
    trainer.train()
    weights = named(gradients=False)
    shadow_of = {id(p): s for p, s in zip(trainer.ema.params, trainer.ema.shadow)} if trainer.ema else {}
    ema = [(name, shadow_of[id(p)].clone()) for chunk in trainer.model
           for name, p in global_parameter_names(chunk.module).items() if id(p) in shadow_of]
    rank = torch.distributed.get_rank()
    if mode == "save":
        norm = sum(g.double().square().sum().item() for _, g in grads) ** 0.5  # one process: each once
        torch.save({"grads": dict(grads), "weights": dict(weights), "ema": dict(ema), "grad_norm_f64": norm},
                   os.path.join(out_dir, "reference.pt"))
        return
    reference = torch.load(mode)
    params = {n: p for chunk in trainer.model for n, p in global_parameter_names(chunk.module).items()}
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    diffs = {"grads": {}, "weights": {}, "ema": {}}
    for kind, tensors in (("grads", grads), ("weights", weights), ("ema", ema)):
        for name, value in tensors:  # a name seen twice (the time embedder of each chunk) keeps the worst
            expected = tp_slice(reference[kind][name], params[name], tp_rank, tp_size)
            scale = expected.abs().max().item() or 1.0
            diff = (value - expected).abs().max().item() / scale
            diffs[kind][name] = max(diffs[kind].get(name, 0.0), diff)
    with open(os.path.join(out_dir, f"diff_rank{rank}.json"), "w") as f:
        json.dump(diffs, f)
