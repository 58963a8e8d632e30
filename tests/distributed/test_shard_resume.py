"""Training on webdataset shards, read by the webdataset library or by DALI: stop and resume is
bitwise the uninterrupted run, at DP=2 (with a DataLoader worker process) and at TP=2 x PP=2
(DALI, a prefetch thread); and the batches do not depend on the data-parallel size for a fixed
number of shard streams. (That DALI and webdataset decode the same samples in the same order is
tests/unit/test_shards.py's.)

The shards are the bundled corpus's documents (the indexed dataset the other tests train on),
packed into 32-token samples by `write_shards`. Every run goes through tools/pretrain_prosec.py.
"""
import os

import pytest

from tests.cli import ok, read_metrics as metrics, run_tool

KEYS = ("loss", "mdm_loss", "sc_loss", "grad_norm", "lr")
# DP=1 against DP=2: the same samples, reduced in another order (test_prosec_layouts.py's tolerance)
LAYOUT_RTOL = 2e-5


@pytest.fixture(scope="module")
def shard_data(shakespeare_corpus, tmp_path_factory):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from prosec_mcore.data import build_tokenizer
    from prosec_mcore.data.shards import write_shards

    prepare_dir = shakespeare_corpus[0].split("=", 1)[1]
    tokenizer = build_tokenizer("hf_json", os.path.join(prepare_dir, "tokenizer.json"))
    documents = IndexedDataset(os.path.join(prepare_dir, "shakespeare_text_document"))
    out = tmp_path_factory.mktemp("shakespeare_shards")
    write_shards((documents[i] for i in range(len(documents))), str(out), seq_length=32, split="90,10,0",
                 vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod, samples_per_shard=500)
    return shakespeare_corpus + [f"data.shards=[{out}/manifest.json]"]


def args_for(shard_data, run_dir, loader, extra=()):
    return shard_data + [f"data.loader={loader}", "data.seq_length=32", "train.iters=4", "train.global_batch_size=8",
                         "train.micro_batch_size=2", "train.lr_warmup_iters=1", "train.eval_interval=4",
                         "train.eval_iters=1", "logging.tensorboard=false", f"run_dir={run_dir}", *extra]


def stop_resume_and_compare(args, reference_args, nproc):
    ok(run_tool("pretrain_prosec.py", reference_args, nproc=nproc))
    stopped = ok(run_tool("pretrain_prosec.py", args + ["train.exit_interval=2"], nproc=nproc))
    assert "saved iteration 2" in stopped.stdout
    resumed = ok(run_tool("pretrain_prosec.py", args + ["train.exit_interval=2"], nproc=nproc))
    assert "iter_0000002 at iteration 2" in resumed.stdout
    assert "the data differ" not in resumed.stdout


def _rows(run_dir):
    return [{k: r[k] for k in KEYS} for r in metrics(run_dir)]


def test_webdataset_stop_and_resume_is_bitwise_at_dp2_with_a_worker(shard_data, tmp_path):
    reference, resumed = tmp_path / "continuous", tmp_path / "resumed"
    extra = ["data.num_workers=1"]
    stop_resume_and_compare(args_for(shard_data, resumed, "webdataset", extra),
                            args_for(shard_data, reference, "webdataset", extra), nproc=2)
    assert [r["iteration"] for r in metrics(resumed)] == [1, 2, 3, 4]
    assert _rows(resumed) == _rows(reference)  # bitwise
    assert metrics(resumed)[-1]["valid_nelbo"] == metrics(reference)[-1]["valid_nelbo"]

    # the same two streams read by one rank: the same global batches, reduced in another order
    single = tmp_path / "dp1"
    ok(run_tool("pretrain_prosec.py", args_for(shard_data, single, "webdataset", ["data.streams=2"]), nproc=1))
    for got, want in zip(_rows(single), _rows(reference), strict=True):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=LAYOUT_RTOL, abs=1e-7), key


def test_dali_stop_and_resume_is_bitwise_at_tp2_pp2(shard_data, tmp_path):
    pytest.importorskip("nvidia.dali", reason="the DALI tier needs nvidia-dali-cuda120 (scripts/run_tests.sh installs it)")
    layout = ["--tp", "2", "--pp", "2"]
    reference, resumed = tmp_path / "continuous", tmp_path / "resumed"
    stop_resume_and_compare(layout + args_for(shard_data, resumed, "dali"),
                            layout + args_for(shard_data, reference, "dali"), nproc=4)
    assert _rows(resumed) == _rows(reference)  # bitwise
