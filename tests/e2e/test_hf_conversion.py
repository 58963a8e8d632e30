"""tools/convert_checkpoint.py end to end: a TP=2 PP=2 training checkpoint -> Hugging Face folder
-> `AutoModelForMaskedLM.from_pretrained(trust_remote_code=True)` -> back to a checkpoint that
training continues from; the round trip reproduces every tensor exactly. The run keeps an EMA of
its weights: the export writes the EMA weights by default and the optimizer's with --weights raw."""
import json
import os
import shlex

import pytest
import torch

from tests.cli import ok, run_tool

def cli(tool, args, nproc=1, timeout=400):
    return ok(run_tool(tool, args, nproc=nproc, timeout=timeout)).stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shakespeare_corpus):
    run_dir = tmp_path_factory.mktemp("hf_run")
    cli("pretrain_prosec.py", ["--tp", "2", "--pp", "2"] + shakespeare_corpus + [
        "model.hidden_size=32", "model.ffn_hidden_size=128", "model.time_embedding_dim=16", "data.seq_length=32",
        "train.iters=2", "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr_warmup_iters=0",
        "train.eval_interval=0", "checkpoint.save_interval=2", "train.ema_decay=0.5", f"run_dir={run_dir}"], nproc=4)
    return run_dir


def test_export_loads_in_transformers_with_matching_logits(trained, tmp_path, single_process_world):
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from prosec_mcore.training.checkpoint import resolve_checkpoint

    out = tmp_path / "hf"
    printed = cli("convert_checkpoint.py", ["export", "--checkpoint", str(trained), "--out", str(out)])
    assert "exported" in printed and "iteration 2" in printed
    assert {"config.json", "model.safetensors", "modeling_proseco.py", "configuration_proseco.py",
            "tokenizer.json"} <= set(os.listdir(out))
    hf = AutoModelForMaskedLM.from_pretrained(str(out), trust_remote_code=True).eval()

    # The megatron side: the TP=2 PP=2 checkpoint loaded (resharded) into one process.
    from prosec_mcore.config_loader import config_from_dict
    from prosec_mcore.model.builder import build_model

    ckpt = resolve_checkpoint(str(trained))
    common = dist_checkpointing.load_common_state_dict(ckpt)
    cfg = config_from_dict(common["config"])
    cfg.parallel.tp, cfg.parallel.pp = 1, 1
    tokens = torch.arange(64).remainder(common["vocab_size"] - 1).view(2, 32)
    sigma = torch.tensor([0.5, 3.0])

    def megatron_logits(ema: bool):
        """The checkpoint's weights (its EMA ones: saved under the `ema.` keys) in one process."""
        model = build_model(cfg, common["vocab_size"]).eval()
        template = model.sharded_state_dict()
        if ema:
            for item in template.values():
                if hasattr(item, "key") and not item.key.endswith("_extra_state"):
                    item.key = "ema." + item.key
        model.load_state_dict(dist_checkpointing.load({"model": template}, ckpt)["model"])
        with torch.no_grad():
            return model(tokens, sigma)[..., : common["vocab_size"]]

    with torch.no_grad():
        got = hf(input_ids=tokens, timesteps=sigma).logits
    torch.testing.assert_close(got, megatron_logits(ema=True), rtol=1e-5, atol=1e-5)
    raw_out = tmp_path / "hf_raw"
    cli("convert_checkpoint.py", ["export", "--checkpoint", str(trained), "--out", str(raw_out), "--weights", "raw"])
    raw = AutoModelForMaskedLM.from_pretrained(str(raw_out), trust_remote_code=True).eval()
    with torch.no_grad():
        got_raw = raw(input_ids=tokens, timesteps=sigma).logits
    torch.testing.assert_close(got_raw, megatron_logits(ema=False), rtol=1e-5, atol=1e-5)
    assert (got_raw - got).abs().max() > 1e-3  # the two exports are different weights

    # Import it back, train from it, export again: every tensor is reproduced exactly.
    ck_dir = tmp_path / "imported"
    printed = cli("convert_checkpoint.py", ["import", "--hf", str(out), "--out", str(ck_dir)])
    assert "checkpoint.pretrained=" in printed
    again = tmp_path / "hf_again"
    cli("convert_checkpoint.py", ["export", "--checkpoint", str(ck_dir), "--out", str(again)])
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)

    overrides = shlex.split(printed.split("train from it with: ")[1].splitlines()[0])
    run = tmp_path / "continued"
    log = cli("pretrain_prosec.py", overrides + [f"data.prepare_dir={common['config']['data']['prepare_dir']}",
                                                 "data.seq_length=32", "train.iters=2", "train.global_batch_size=4",
                                                 "train.micro_batch_size=2", "train.eval_interval=0",
                                                 f"run_dir={run}"])
    assert "starting from the pretrained weights of" in log and "done at iteration 2/2" in log


def test_llada_family_round_trip_through_the_cli(tmp_path, shakespeare_corpus):
    """Llama-style (LLaDA layout): train, export, load with transformers, import, export again."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    run_dir = tmp_path / "run"
    cli("pretrain_prosec.py", shakespeare_corpus + [
        "model.style=llama", "model.time_conditioning=none", "model.hidden_size=32", "model.num_query_groups=2",
        "model.ffn_hidden_size=96", "data.seq_length=32", "train.iters=1", "train.global_batch_size=2",
        "train.micro_batch_size=2", "train.eval_interval=0", "checkpoint.save_interval=1", f"run_dir={run_dir}"])
    first = tmp_path / "hf"
    cli("convert_checkpoint.py", ["export", "--checkpoint", str(run_dir), "--out", str(first)])
    hf = AutoModelForMaskedLM.from_pretrained(str(first), trust_remote_code=True).eval()
    with torch.no_grad():
        logits = hf(input_ids=torch.arange(16).view(1, 16)).logits
    assert logits.shape == (1, 16, 1024) and torch.isfinite(logits).all()
    config = json.loads((first / "config.json").read_text())
    assert config["torch_dtype"] == "float32"  # a CPU (fp32) run's weights are written as they are stored
    assert config["mask_token_id"] == 1023 and all(isinstance(config[k], int) for k in ("eos_token_id",
                                                                                         "pad_token_id"))
    cli("convert_checkpoint.py", ["import", "--hf", str(first), "--out", str(tmp_path / "imported")])
    second = tmp_path / "hf_again"
    cli("convert_checkpoint.py", ["export", "--checkpoint", str(tmp_path / "imported"), "--out", str(second)])
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
