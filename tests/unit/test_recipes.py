"""The recipes of configs/recipe/ resolve to the reference's values (docs/recipes.md).

The expected values are written here from the reference's scripts and configs
(kuleshov-group/proseco: scripts/train_qm9_guidance_corrector.sh, scripts/train_owt_mdlm_corrector.sh,
configs/config.yaml, model/small.yaml, data/qm9.yaml, lr_scheduler/*.yaml), not read from the recipes.
"""
import pytest

from prosec_mcore.config import validate_config
from prosec_mcore.config_loader import load_config

SMALL_DIT = {"model.style": "dit", "model.num_layers": 12, "model.hidden_size": 768,
             "model.num_attention_heads": 12, "model.ffn_hidden_size": 3072, "model.time_embedding_dim": 128,
             "model.hidden_dropout": 0.1, "model.zero_timestep": True, "model.time_conditioning": "adaln"}
CORRECTOR = {"objective.name": "proseco", "objective.schedule": "loglinear", "objective.schedule_eps": 1e-3,
             "objective.eps_train": 0.1, "objective.eps_valid": 1e-3, "objective.antithetic": True,
             "objective.lambda_mdm": 1.0, "objective.lambda_sc": 1.0, "objective.corrector_input": "all",
             "objective.weighted_corrector_loss": True}
OPTIM = {"train.lr": 3e-4, "train.adam_beta1": 0.9, "train.adam_beta2": 0.999, "train.adam_eps": 1e-8,
         "train.weight_decay": 0.0, "train.clip_grad": 1.0, "train.ema_decay": 0.9999, "train.ema_warmup": True,
         "train.seed": 1}

QM9 = {**SMALL_DIT, **CORRECTOR, **OPTIM,
       "model.max_sequence_length": 32, "data.seq_length": 32, "data.name": "qm9",
       "data.labels": "data_cache/qm9/qm9_labels_qed.npy", "model.num_classes": 2,
       "model.label_combination": "silu_sum", "objective.cond_dropout": 0.1,
       "objective.errors_upweighted": False,
       "train.iters": 25000, "train.global_batch_size": 2048, "train.micro_batch_size": 256,
       "train.lr_warmup_iters": 1000, "train.lr_warmup_init": 1e-6, "train.lr_decay_style": "cosine",
       "train.min_lr": 3e-6, "checkpoint.save_interval": 5000}
OWT = {**SMALL_DIT, **CORRECTOR, **OPTIM,
       "model.max_sequence_length": 1024, "data.seq_length": 1024, "data.tokenizer.kind": "gpt2_bpe",
       "model.num_classes": 0, "objective.cond_dropout": 0.0, "objective.errors_upweighted": True,
       "train.iters": 2_000_000, "train.global_batch_size": 512, "train.lr_warmup_iters": 2500,
       "train.lr_warmup_init": 0.0, "train.lr_decay_style": "constant", "train.min_lr": 3e-4,
       "train.eval_interval": 10000, "checkpoint.save_interval": 10000}


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("recipe,expected,world", [("qm9_guidance_corrector", QM9, 8), ("owt_corrector", OWT, 8)])
def test_recipe_resolves_to_the_reference_values(recipe, expected, world):
    cfg = load_config([f"recipe={recipe}"])
    wrong = {key: (_get(cfg, key), want) for key, want in expected.items() if _get(cfg, key) != want}
    assert not wrong, f"{recipe}: (got, reference) {wrong}"
    validate_config(cfg, world_size=world, cuda_available=True, te_available=False)


def test_an_objective_override_keeps_the_rest_of_the_recipe():
    cfg = load_config(["recipe=qm9_guidance_corrector", "objective=mdlm"])
    assert cfg.objective.name == "mdlm"
    assert (cfg.objective.eps_train, cfg.train.ema_decay, cfg.model.hidden_dropout) == (0.1, 0.9999, 0.1)


def test_the_cpu_recipe_changes_only_size_and_length():
    ref, cpu = load_config(["recipe=qm9_guidance_corrector"]), load_config(["recipe=qm9_guidance_corrector_cpu"])
    scaled = {"model.name", "model.num_layers", "model.hidden_size", "model.num_attention_heads",
              "model.ffn_hidden_size", "train.iters", "train.global_batch_size", "train.micro_batch_size",
              "train.lr", "train.lr_warmup_iters", "train.min_lr", "train.eval_interval", "train.eval_iters",
              "train.log_interval", "checkpoint.save_interval", "run_dir"}
    for key in set(QM9) - scaled:
        assert _get(cpu, key) == _get(ref, key), key
    assert cpu.train.min_lr == pytest.approx(cpu.train.lr / 100)
    validate_config(cpu, world_size=1, cuda_available=False, te_available=False)


# LLaDA's SFT (Nie et al. 2025, section 2.3; ML-GSAI/LLaDA GUIDELINES.md), written here from the
# paper: batch 256 (2 per GPU), 3 epochs of 4.5M pairs, warm-up 0 -> 2.5e-5 over 50 iterations,
# weight decay 0.1, the answer-length normaliser with the EOS padding counted, LLaDA-8B's shape.
LLADA_SFT = {"data.format": "sft", "objective.name": "proseco", "objective.sft_normalization": "response",
             "objective.sft_pad_in_loss": True, "train.global_batch_size": 256, "train.micro_batch_size": 2,
             "train.iters": 4_500_000 * 3 // 256, "train.lr": 2.5e-5, "train.lr_warmup_iters": 50,
             "train.lr_warmup_init": 0.0, "train.weight_decay": 0.1, "model.style": "llama",
             "model.time_conditioning": "none", "model.num_layers": 32, "model.hidden_size": 4096,
             "data.seq_length": 4096, "data.variable_length_fraction": 0.0, "data.document_attention": False}


def test_llada_sft_recipe_resolves_to_the_published_values():
    cfg = load_config(["recipe=llada8b_sft"])
    wrong = {key: (_get(cfg, key), want) for key, want in LLADA_SFT.items() if _get(cfg, key) != want}
    assert not wrong, f"llada8b_sft: (got, LLaDA) {wrong}"
    validate_config(cfg, world_size=128, cuda_available=True, te_available=False)
    assert load_config(["recipe=llada8b_sft", "objective=mdlm"]).data.format == "sft"  # the vanilla-SFT baseline
