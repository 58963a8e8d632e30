"""ProSeCo SFT end to end: imported LLaDA weights, SFT data on disk, DP=2, stop and resume.

The flow of docs/sft.md on a tiny stand-in for LLaDA-8B (tests/e2e/test_llada_start.py's: a byte-level
BPE tokenizer with "<|mdm_mask|>" in the middle of its ids, a random LLaDA-layout model with more
rows than the tokenizer has ids): (prompt, response) records are written as an SFT dataset
(`prosec_mcore.data.sft.write_sft_dataset`, what `tools/preprocess_data.py --sft` runs), the
model is imported (`convert_checkpoint.py import`), and `pretrain_prosec.py` fine-tunes it with
data.format=sft on 2 data-parallel ranks, saving at iteration 2. Checked:

* iteration 1 (its loss is computed before the first update) equals the SFT ProSeCo loss of the
  Hugging Face model computed here in plain PyTorch on the same examples and noise: the prompt
  never masked and never in the loss, y = argmax on the response and x on the prompt, each
  example's terms divided by its response length (padding included, the defaults), then the
  mean over the examples;
* a second run that loads the checkpoint of iteration 2 logs iterations 3 and 4 bitwise as the
  uninterrupted run does (the noise, the batches and the prompt masks are functions of the
  iteration alone).
"""
import shlex

import pytest

from tests.cli import ok, read_metrics, run_tool
from tests.e2e.test_llada_start import MASK_ID, MODEL_VOCAB, TOKENIZER_VOCAB, _documents, save_tiny_llada

SEQ = 64
KEYS = ("loss", "mdm_loss", "sc_loss", "grad_norm", "lr", "mask_fraction", "response_fraction")
TRAIN = ["data.format=sft", f"data.seq_length={SEQ}", "objective=proseco", "train.iters=4",
         "train.global_batch_size=4", "train.micro_batch_size=1", "train.lr_warmup_iters=0", "train.eval_interval=0",
         "logging.tensorboard=false", "checkpoint.save_interval=2"]


def _records(docs):
    """(prompt, response) pairs cut from the corpus's text: short prompts, answers of varied length."""
    lines = [line.strip() for doc in docs for line in doc.splitlines() if len(line.strip()) > 12]
    return [{"prompt": lines[i][:24], "response": lines[i + 1][:8 + (7 * i) % 40]} for i in range(0, 80, 2)]


@pytest.fixture(scope="module")
def sft_llada(tmp_path_factory, shakespeare_corpus):
    from prosec_mcore.config_loader import load_config
    from prosec_mcore.data.sft import write_sft_dataset
    from prosec_mcore.training.trainer import build_run_tokenizer, resolve_tokenizer_path

    root = tmp_path_factory.mktemp("sft_llada")
    docs = _documents(shakespeare_corpus[0].split("=", 1)[1])
    hf_dir = root / "tiny-llada"
    save_tiny_llada(hf_dir, docs, seed=3, max_sequence_length=SEQ, loud_invalid_rows=False)
    printed = ok(run_tool("convert_checkpoint.py", ["import", "--hf", str(hf_dir), "--out",
                                                    str(root / "imported")], timeout=200)).stdout
    overrides = shlex.split(printed.split("train from it with: ")[1].splitlines()[0])
    # the SFT data, written with the tokenizer the run builds from the import's overrides
    cfg = load_config(overrides + TRAIN)
    tokenizer = build_run_tokenizer(cfg, resolve_tokenizer_path(cfg))
    prefix = root / "data" / "tiny_sft"
    stats = write_sft_dataset(_records(docs), tokenizer, str(prefix), SEQ, template="default", overlong="truncate")
    assert stats["examples"] == 40 and stats["pad_tokens"] > 0 and stats["prompt_tokens"] > 0
    return hf_dir, overrides + [f"data.data_prefix={prefix}"] + TRAIN


def hf_sft_loss(run_args, hf_dir) -> dict:
    """Iteration 1's SFT loss terms, from the Hugging Face model in plain PyTorch: the run's first
    global batch (samples 0..G-1 of its data), its noise (seed, times, uniforms: diffusion/noise.py),
    and the objective written out here."""
    import torch

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.data.sources import build_run_data
    from prosec_mcore.diffusion.noise import STREAM_TRAIN_MASK, STREAM_TRAIN_TIME, sample_times, token_uniforms
    from prosec_mcore.diffusion.schedules import build_schedule
    from prosec_mcore.hf.llada.modeling_llada import LLaDAModelLM
    from prosec_mcore.training.trainer import build_run_tokenizer, resolve_tokenizer_path

    cfg = load_config(run_args)
    o, t = cfg.objective, cfg.train
    assert (o.sft_normalization, o.sft_pad_in_loss, o.corrector_input) == ("response", True, "all")
    tokenizer = build_run_tokenizer(cfg, resolve_tokenizer_path(cfg))
    data = build_run_data(cfg, tokenizer, (t.iters * t.global_batch_size, 0, 0), "unused")
    samples = [data.train[i] for i in range(t.global_batch_size)]
    x = torch.stack([s["tokens"] for s in samples])
    prompt = torch.stack([s["prompt_mask"] for s in samples])
    index = torch.arange(t.global_batch_size)
    times = sample_times(t.seed, index, torch.zeros_like(index), index, t.global_batch_size, o.eps_train,
                         o.antithetic, STREAM_TRAIN_TIME)
    schedule = build_schedule(o.schedule, o.schedule_eps)
    masked = (token_uniforms(t.seed, index, SEQ, STREAM_TRAIN_MASK) < schedule.mask_probability(times)[:, None]) & ~prompt
    w = schedule.loss_weight(times).float()[:, None]
    response = ~prompt  # padding counts (objective.sft_pad_in_loss=true)
    n = response.sum(1, keepdim=True).float()
    hf = LLaDAModelLM.from_pretrained(str(hf_dir)).eval()
    never = (torch.arange(MODEL_VOCAB) == MASK_ID) | (torch.arange(MODEL_VOCAB) >= TOKENIZER_VOCAB)
    with torch.no_grad():
        def log_probs(tokens):
            return torch.log_softmax(hf(input_ids=tokens).logits.masked_fill(never, float("-inf")), dim=-1)

        logp = log_probs(torch.where(masked, torch.full_like(x, MASK_ID), x))
        ce = -logp.gather(-1, x[..., None]).squeeze(-1)
        mdm = ((w * ce * masked) / n).sum() / len(x)
        y = torch.where(prompt, x, logp.argmax(-1))
        ce2 = -log_probs(y).gather(-1, x[..., None]).squeeze(-1)
        per = torch.where(y != x, w * ce2, -w * torch.exp(-ce2)) if o.errors_upweighted else w * ce2
        sc = ((per * response) / n).sum() / len(x)
    return {"mdm_loss": mdm.item(), "sc_loss": sc.item(), "loss": o.lambda_mdm * mdm.item() + o.lambda_sc * sc.item(),
            "mask_fraction": masked.sum().item() / response.sum().item()}


def test_sft_from_imported_llada_at_dp2_resumes_bitwise(sft_llada, tmp_path):
    hf_dir, run_args = sft_llada
    first = ok(run_tool("pretrain_prosec.py", run_args + [f"run_dir={tmp_path / 'run'}"], nproc=2))
    assert "starting from the pretrained weights of" in first.stdout and "SFT: prompts never masked" in first.stdout
    rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]

    ref = hf_sft_loss(run_args + [f"run_dir={tmp_path / 'run'}"], hf_dir)
    for key in ("loss", "mdm_loss", "sc_loss"):  # fp32; measured agreement 3e-7 relative
        assert rows[0][key] == pytest.approx(ref[key], rel=1e-5), key
    assert rows[0]["mask_fraction"] == pytest.approx(ref["mask_fraction"], rel=1e-12)

    resumed = ok(run_tool("pretrain_prosec.py", run_args + [
        f"run_dir={tmp_path / 'resumed'}", f"checkpoint.load={tmp_path / 'run' / 'checkpoints' / 'iter_0000002'}"],
        nproc=2))
    assert "the data differ" not in resumed.stdout
    again = read_metrics(tmp_path / "resumed")
    assert [r["iteration"] for r in again] == [3, 4]
    for a, b in zip(rows[2:], again):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, a["iteration"]  # bitwise
