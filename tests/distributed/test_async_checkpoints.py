"""Asynchronous checkpoint saves (`checkpoint.async_save=true`) on two pipeline ranks (PP=2, gloo).

An async save returns as soon as megatron-core has forked a writer per rank; the checkpoint only
becomes COMPLETE, and `latest`, when the queue is finalised after every rank's writer finished.
One torchrun job (the worker below, on every rank) checks, with the real Trainer:

* the training loop (async save at iteration 2 while iteration 3 runs, then the final save at 3)
  ends with both checkpoints COMPLETE and `latest` at iteration 3;
* a checkpoint scheduled asynchronously is neither COMPLETE nor `latest` until it is finalised,
  even after its writer has long finished and training has changed the weights;
* the async checkpoint equals a synchronous save of the same state: after loading either one the
  weights are bitwise equal and the next training step gives bitwise the same loss;
* the checkpoint written in the background at iteration 2 (weights updated by iteration 3 during
  the write) resumes iteration 3 with bitwise the loss the uninterrupted loop logged.
"""
import json
import os

from tests.distributed.launch import run_distributed


def _overrides(prepare_dir: str, run_dir: str) -> list:
    return [f"data.prepare_dir={prepare_dir}", "parallel.pp=2", "model.num_layers=2", "data.seq_length=32",
            "train.iters=3", "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr_warmup_iters=1",
            "train.eval_interval=0", "train.log_interval=1", "logging.tensorboard=false",
            "checkpoint.save_interval=2", "checkpoint.async_save=true", "checkpoint.keep_last=0",
            f"run_dir={run_dir}"]


def async_worker(prepare_dir: str, run_dir: str) -> None:
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.training.checkpoint import find_latest, is_complete, load_checkpoint, save_checkpoint
    from prosec_mcore.training.trainer import Trainer

    trainer = Trainer(load_config(_overrides(prepare_dir, run_dir)))
    trainer.train()
    ckdir = trainer.save_dir
    queue = trainer.run.async_queue
    latest = lambda: open(os.path.join(ckdir, "latest")).read()  # noqa: E731
    assert latest() == "iter_0000003", latest()
    assert is_complete(os.path.join(ckdir, "iter_0000002")) and is_complete(os.path.join(ckdir, "iter_0000003"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = {row["iteration"]: row["loss"] for row in map(json.loads, f)}

    def params():
        return [p.detach().clone() for chunk in trainer.model for p in chunk.parameters()]

    def step_loss(start_iteration: int) -> float:
        return trainer.train_step(trainer.microbatches(start_iteration), start_iteration + 1)["loss"]

    # The same state saved synchronously (first: one save in flight at a time) and asynchronously.
    sync_dir, async_dir = os.path.join(run_dir, "sync"), os.path.join(run_dir, "async")
    save_checkpoint(trainer, 3, sync_dir, keep_last=0)
    save_checkpoint(trainer, 3, async_dir, keep_last=0, async_queue=queue)
    step_loss(3)  # training moves on while the writers run
    writer = queue.async_calls[0].async_caller.process  # megatron 0.16.1: the forked writer
    if writer is not None:
        writer.join()  # this rank's shards are written; still nothing may count before finalisation
    torch.distributed.barrier()
    assert queue.get_num_unfinalized_calls() == 1
    assert not is_complete(os.path.join(async_dir, "iter_0000003")) and find_latest(async_dir) is None
    queue.maybe_finalize_async_calls(blocking=True)
    assert is_complete(os.path.join(async_dir, "iter_0000003"))
    assert open(os.path.join(async_dir, "latest")).read() == "iter_0000003"

    results = {}
    for name, directory in (("sync", sync_dir), ("async", async_dir)):
        load_checkpoint(trainer, os.path.join(directory, "iter_0000003"))
        results[name] = (params(), step_loss(3))
    assert all(torch.equal(a, b) for a, b in zip(results["sync"][0], results["async"][0]))
    assert results["sync"][1] == results["async"][1]

    # Written in the background at iteration 2 while the loop ran iteration 3.
    iteration, rng_restored = load_checkpoint(trainer, os.path.join(ckdir, "iter_0000002"))
    assert (iteration, rng_restored) == (2, True)
    assert step_loss(2) == logged[3], (logged[3],)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(run_dir, "worker_ok"), "w") as f:
            f.write("ok")


def test_async_save_finalises_late_and_equals_sync_save(tmp_path, shakespeare_corpus):
    prepare_dir = shakespeare_corpus[0].split("=", 1)[1]
    out = run_distributed("tests/distributed/test_async_checkpoints.py:async_worker", nproc=2,
                          args=[prepare_dir, str(tmp_path)], timeout=240)
    assert (tmp_path / "worker_ok").exists(), out[-3000:]
    assert "writing checkpoint" in out and "in the background" in out
    assert out.index("writing checkpoint " + str(tmp_path / "checkpoints" / "iter_0000002")) < \
        out.index("saved checkpoint " + str(tmp_path / "checkpoints" / "iter_0000002"))
