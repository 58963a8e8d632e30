"""ProSeCo training started from LLaDA weights (the paper's 8B experiment), on a tiny stand-in.

LLaDA-8B's tokenizer puts its mask token "<|mdm_mask|>" at id 126336, *not* the last id, and the
model has 126464 embedding rows, more than the tokenizer has ids. The tiny folder built here has
the same two properties: a 300-id byte-level BPE tokenizer with "<|mdm_mask|>" at id 250, and a
random LLaDA-layout model with 320 rows (megatron pads them to 384). Whose output rows for the
mask and for ids 300..319 are scaled up, so that an unsuppressed argmax would pick them almost
everywhere: the loss must give them no probability.

The flow is the README's ("Starting from LLaDA weights"): preprocess text with the model's
tokenizer, `convert_checkpoint.py import`, then `pretrain_prosec.py` (TP=2) with the overrides the
import printed. The first iteration's loss (computed before the first update) must equal the
ProSeCo loss of the Hugging Face model computed in plain PyTorch on the same masked input.
"""
import json
import math
import os
import shlex

import pytest

from tests.cli import ok, read_metrics, run_tool
from tests.distributed.launch import run_distributed

MASK_ID, TOKENIZER_VOCAB, MODEL_VOCAB = 250, 300, 320
SPECIALS = {"<|mdm_mask|>": MASK_ID, "<|endoftext|>": 298, "<|eot_id|>": 299}
TRAIN = ["data.seq_length=32", "objective=proseco", "train.iters=3", "train.global_batch_size=4",
         "train.micro_batch_size=2", "train.lr_warmup_iters=0", "train.eval_interval=0", "logging.tensorboard=false"]


def _documents(prepare_dir, count=20, chars=3000):
    with open(os.path.join(prepare_dir, "shakespeare.jsonl")) as f:
        return [json.loads(line)["text"][:chars] for _, line in zip(range(count), f)]


def _tokenizer_json(docs) -> str:
    """Byte-level BPE of 297 learned ids, renumbered around a hole at MASK_ID, plus the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=297, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tk.to_str())
    vocab = {token: i if i < MASK_ID else i + 1 for token, i in data["model"]["vocab"].items()}
    assert len(vocab) == 297 and max(vocab.values()) == 297
    data["model"]["vocab"] = {**vocab, **SPECIALS}
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in SPECIALS.items()]
    return json.dumps(data)


def save_tiny_llada(hf_dir, docs, seed: int, max_sequence_length: int = 64, loud_invalid_rows: bool = True):
    """A random LLaDA-layout model (2 layers, hidden 32, MODEL_VOCAB rows) and the BPE tokenizer
    (TOKENIZER_VOCAB ids, the mask at MASK_ID) in a Hugging Face folder. Its weights are moved off
    their initialisation (a generic point: every block contributes); with `loud_invalid_rows` the
    output rows of the mask and of the ids beyond the tokenizer are scaled up, so that an
    unsuppressed argmax would pick them almost everywhere."""
    import torch

    from prosec_mcore.hf.llada.configuration_llada import LLaDAConfig
    from prosec_mcore.hf.llada.modeling_llada import LLaDAModelLM
    from prosec_mcore.hf.llada_bridge import LLADA_8B_BASE_CONFIG

    config = LLaDAConfig(**{**LLADA_8B_BASE_CONFIG, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
                            "mlp_hidden_size": 48, "vocab_size": MODEL_VOCAB, "embedding_size": MODEL_VOCAB,
                            "max_sequence_length": max_sequence_length, "mask_token_id": MASK_ID,
                            "eos_token_id": 298, "pad_token_id": 298, "torch_dtype": "float32"})
    torch.manual_seed(seed)
    model = LLaDAModelLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        if loud_invalid_rows:
            out = model.model.transformer.ff_out.weight
            out[MASK_ID] *= 20.0
            out[TOKENIZER_VOCAB:] *= 20.0
    model.save_pretrained(str(hf_dir))
    (hf_dir / "tokenizer.json").write_text(_tokenizer_json(docs))


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory, shakespeare_corpus):
    root = tmp_path_factory.mktemp("llada")
    docs = _documents(shakespeare_corpus[0].split("=", 1)[1])
    hf_dir = root / "tiny-llada"
    save_tiny_llada(hf_dir, docs, seed=7)
    with open(root / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    prefix = root / "data" / "tiny_text_document"
    ok(run_tool("preprocess_data.py", ["--input", str(root / "docs.jsonl"), "--tokenizer-path", str(hf_dir),
                                       "--eod-token", "<|endoftext|>", "--mask-token", "<|mdm_mask|>",
                                       "--output-prefix", str(prefix), "--no-progress"], timeout=120))
    printed = ok(run_tool("convert_checkpoint.py", ["import", "--hf", str(hf_dir), "--out",
                                                    str(root / "imported")], timeout=200)).stdout
    overrides = shlex.split(printed.split("train from it with: ")[1].splitlines()[0])
    return hf_dir, prefix, overrides


def reference_worker(overrides_json: str, hf_dir: str, out_path: str) -> None:
    """One process (TP=1): the exact first batch of the run, its loss from the imported megatron
    model, the same loss from the Hugging Face model in plain PyTorch, and vocabulary checks."""
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    import torch

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.diffusion import losses
    from prosec_mcore.hf.llada.modeling_llada import LLaDAModelLM
    from prosec_mcore.training.step import noise_microbatch
    from prosec_mcore.training.trainer import Trainer

    trainer = Trainer(load_config(json.loads(overrides_json)))
    o = trainer.cfg.objective
    assert (o.corrector_input, o.errors_upweighted, o.weighted_corrector_loss) == ("all", True, True)
    assert (trainer.mask_id, trainer.tokenizer_vocab_size, trainer.vocab_size) == (MASK_ID, TOKENIZER_VOCAB,
                                                                                    MODEL_VOCAB)
    noise = trainer.noise_settings(valid=False)
    microbatches = trainer.microbatches(0)
    batches = [noise_microbatch(mb, trainer.step.schedule, noise, MASK_ID, "cpu") for mb in microbatches]
    megatron = trainer.step.run(microbatches, noise, forward_only=True)

    hf = LLaDAModelLM.from_pretrained(hf_dir).eval()
    ids = torch.arange(MODEL_VOCAB)
    never = (ids == MASK_ID) | (ids >= TOKENIZER_VOCAB)  # written out here, independently of losses.py

    def log_probs(tokens):
        return torch.log_softmax(hf(input_ids=tokens).logits.masked_fill(never, float("-inf")), dim=-1)

    mdm = sc = tokens = 0.0
    with torch.no_grad():
        for nb in batches:
            w = nb.weight[:, None]
            logp = log_probs(nb.noised)
            ce = -logp.gather(-1, nb.clean[..., None]).squeeze(-1)
            mdm += (w * ce)[nb.masked].sum().item()
            y = logp.argmax(-1)
            ce2 = -log_probs(y).gather(-1, nb.clean[..., None]).squeeze(-1)
            sc += torch.where(y != nb.clean, w * ce2, -w * torch.exp(-ce2)).sum().item()
            tokens += nb.clean.numel()

        # Megatron's logits of the imported model, and what the loss code lets it predict.
        nb = batches[0]
        logits = trainer.model[0].module(nb.noised, nb.sigma)
        padded = logits.shape[-1]
        hf_logits = hf(input_ids=nb.noised).logits
        invalid = losses.invalid_vocab_mask(padded, trainer.step.vocab_size, trainer.mask_id)
        suppressed = losses.suppress_invalid(logits, invalid)
        terms = losses.mdm_terms(logits.clone(), nb.clean, nb.masked, nb.weight, invalid)  # it consumes its logits
        bad = torch.zeros(padded, dtype=torch.bool)
        bad[MASK_ID] = True
        bad[TOKENIZER_VOCAB:] = True
    result = {
        "hf": {"loss": (mdm + sc) / tokens, "mdm_loss": mdm / tokens, "sc_loss": sc / tokens},
        "megatron": {k: megatron[k] for k in ("loss", "mdm_loss", "sc_loss")},
        "padded_vocab": padded,
        "logits_max_diff": (logits[..., :MODEL_VOCAB] - hf_logits).abs().max().item(),
        "logits_scale": hf_logits.abs().max().item(),
        "invalid_is_exactly_mask_and_padding": bool(torch.equal(invalid, bad)),
        "raw_argmax_invalid_fraction": bad[logits.argmax(-1)].float().mean().item(),
        "argmax_invalid": int(bad[suppressed.argmax(-1)].sum()),
        "corrector_input_invalid": int(bad[terms.corrector_input].sum()),
        "invalid_probability": torch.softmax(suppressed, dim=-1)[..., bad].max().item(),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


def test_proseco_training_starts_from_imported_llada_weights(llada_folder, tmp_path):
    hf_dir, prefix, overrides = llada_folder
    assert f"model.vocab_size={MODEL_VOCAB}" in overrides
    assert "data.tokenizer.mask_token='<|mdm_mask|>'" in overrides
    assert "data.tokenizer.eod_token='<|endoftext|>'" in overrides
    run_args = overrides + [f"data.data_prefix={prefix}"] + TRAIN

    run = ok(run_tool("pretrain_prosec.py", ["--tp", "2"] + run_args + [f"run_dir={tmp_path / 'run'}",
                                                                         "checkpoint.save_interval=3"], nproc=2))
    assert "starting from the pretrained weights of" in run.stdout and "mask_id 250" in run.stdout, run.stdout[-2000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "mdm_loss", "sc_loss", "grad_norm"))

    out = tmp_path / "reference.json"
    run_distributed("tests/e2e/test_llada_start.py:reference_worker", nproc=None, timeout=200,
                    args=[json.dumps(run_args + [f"run_dir={tmp_path / 'reference'}"]), str(hf_dir), str(out)])
    ref = json.loads(out.read_text())
    assert ref["padded_vocab"] == 384 and ref["invalid_is_exactly_mask_and_padding"]
    assert ref["logits_max_diff"] <= 1e-5 * ref["logits_scale"]  # the import reproduces the HF model
    assert ref["raw_argmax_invalid_fraction"] > 0.5  # the scaled-up rows would win unsuppressed...
    assert ref["argmax_invalid"] == 0 and ref["corrector_input_invalid"] == 0  # ...but are never predicted
    assert ref["invalid_probability"] == 0.0
    for key in ("loss", "mdm_loss", "sc_loss"):  # iteration 1 is computed before the first update
        assert ref["megatron"][key] == pytest.approx(ref["hf"][key], rel=1e-5), key
        assert rows[0][key] == pytest.approx(ref["hf"][key], rel=1e-5), key

    # Exported back, the folder keeps LLaDA's vocabulary layout: 320 rows, the mask at 250.
    from prosec_mcore.data.tokenizer import build_tokenizer

    # The run's own checkpoints carry what the import recorded of the source (config, ids, dtype)
    from prosec_mcore.training.checkpoint import load_common

    pretrained = next(o.split("=", 1)[1] for o in overrides if o.startswith("checkpoint.pretrained="))
    trained = load_common(str(tmp_path / "run" / "checkpoints" / "iter_0000003"))
    assert trained["hf_source"] == load_common(pretrained)["hf_source"] and trained["hf_source"]["config"]

    exported = tmp_path / "hf_out"
    ok(run_tool("convert_checkpoint.py", ["export", "--checkpoint", str(tmp_path / "run"), "--out", str(exported)]))
    config = json.loads((exported / "config.json").read_text())
    assert (config["vocab_size"], config["embedding_size"], config["mask_token_id"]) == (MODEL_VOCAB, MODEL_VOCAB,
                                                                                          MASK_ID)
    # eos/pad as the source had them (LLaDA's class would otherwise read its default 50256), and the
    # folder's own tokenizer file, not the bundled one
    assert (config["eos_token_id"], config["pad_token_id"]) == (298, 298)
    assert (exported / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    tokenizer = build_tokenizer("auto", str(exported))
    assert (tokenizer.mask_id, tokenizer.vocab_size, tokenizer.eod) == (MASK_ID, TOKENIZER_VOCAB, 298)


def test_a_run_with_another_mask_token_is_refused(llada_folder, tmp_path):
    hf_dir, prefix, overrides = llada_folder
    without_mask = [o for o in overrides if not o.startswith("data.tokenizer.mask_token=")]
    result = run_tool("pretrain_prosec.py", without_mask + [f"data.data_prefix={prefix}"] + TRAIN +
                      [f"run_dir={tmp_path}"], timeout=200)
    assert result.returncode == 2
    assert "trained with mask id 250 but this run's tokenizer has mask id 300" in result.stderr, result.stderr[-2000:]
