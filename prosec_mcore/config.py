"""Typed configuration for a ProSeCo pre-training run.

Hydra composes the YAML tree in `configs/` (groups `model`, `data`, `objective`, `train`,
`parallel`, `logging`) and applies command-line overrides; the result is merged into these
dataclasses in OmegaConf *struct* mode, so a misspelled key is an error rather than a silently
ignored setting (the Megatron-Bridge pattern: Hydra as an override parser on typed dataclasses).

`validate_config` checks everything that can be checked before any work starts (parallel
layout against the model shape and the world size, batch arithmetic, sequence length) and
raises `ConfigError` with a one-line message that says what is wrong and how to fix it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass
class ModelConfig:
    """Shape and flavour of the bidirectional transformer.

    style:  `dit`   LayerNorm, GELU-tanh MLP with bias (the ProSeCo/MDLM reference backbone)
            `llama` RMSNorm, SwiGLU MLP, no biases (LLaDA-style)
    time_conditioning: `adaln` (DiT adaLN modulation from a sinusoidal+MLP embedding of the
            noise level) or `none` (the network never sees t, as in LLaDA).
    zero_timestep: keep the adaLN path but feed sigma = 0, as the reference OWT recipe does.
    """

    name: str = "tiny"
    style: str = "dit"
    num_layers: int = 8
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 256
    max_sequence_length: int = 128
    vocab_size: Optional[int] = None  # None: taken from the tokenizer (must match if given)
    time_conditioning: str = "adaln"
    zero_timestep: bool = False
    time_embedding_dim: int = 64  # "cond_dim" of the reference DiT
    rotary_base: int = 10000
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5


@dataclass
class TokenizerConfig:
    kind: str = "hf_json"  # hf_json | gpt2_bpe | char
    path: Optional[str] = None  # None: the tokenizer prepared with the bundled corpus


@dataclass
class DataConfig:
    name: str = "shakespeare"
    data_prefix: Optional[str] = None  # megatron indexed dataset prefix (<prefix>.bin/.idx)
    prepare_dir: str = "data_cache/shakespeare"  # where the bundled corpus is prepared
    seq_length: int = 128
    split: str = "90,10,0"
    num_workers: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class ObjectiveConfig:
    """The training objective; see `prosec_mcore/diffusion/losses.py` for the math.

    name: `mdlm` (masked-diffusion loss only) or `proseco` (adds the self-correction term).
    corrector_input: `all` (y = argmax x_theta(z_t) at every position, the reference recipe)
        or `masked` (argmax only at masked positions, clean tokens elsewhere).
    errors_upweighted: where y == x use -w p(x) instead of -w log p(x).
    weighted_corrector_loss: multiply the corrector term by w(t) (reference: true).
    """

    name: str = "proseco"
    schedule: str = "loglinear"  # loglinear | linear | cosine
    schedule_eps: float = 1e-3
    eps_train: float = 1e-3
    eps_valid: float = 1e-3
    antithetic: bool = True
    lambda_mdm: float = 1.0
    lambda_sc: float = 1.0
    corrector_input: str = "all"
    errors_upweighted: bool = False
    weighted_corrector_loss: bool = True


@dataclass
class TrainConfig:
    iters: int = 200
    global_batch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_warmup_iters: int = 20
    lr_decay_style: str = "cosine"  # cosine | constant | linear
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    log_interval: int = 10
    eval_interval: int = 100  # 0 disables periodic validation
    eval_iters: int = 4
    exit_interval: int = 0  # save and exit after an iteration divisible by this (0: off), as Megatron-LM


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual (interleaved) pipeline stages per pipeline rank
    sequence_parallel: bool = False


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (training/checkpoint.py).

    save_dir: None -> <run_dir>/checkpoints. save_interval: iterations between saves (0: no
    periodic saves). A run whose save_dir holds a complete checkpoint resumes from the newest
    one (`resume`); `load` names a checkpoint directory explicitly and wins over `resume`.
    SIGTERM / SIGUSR1 (SLURM's pre-emption warnings) make the job save and exit cleanly.
    """

    save_dir: Optional[str] = None
    save_interval: int = 0
    keep_last: int = 3
    load: Optional[str] = None
    resume: bool = True
    save_on_exit_signal: bool = True


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "prosec-mcore"
    wandb_mode: str = "offline"


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_CHOICES = {
    "model.style": ("dit", "llama"),
    "model.time_conditioning": ("adaln", "none"),
    "objective.name": ("proseco", "mdlm"),
    "objective.schedule": ("loglinear", "linear", "cosine"),
    "objective.corrector_input": ("all", "masked"),
    "train.lr_decay_style": ("cosine", "constant", "linear"),
    "train.precision": ("auto", "fp32", "bf16"),
    "data.tokenizer.kind": ("hf_json", "gpt2_bpe", "char"),
}


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate_config(cfg: Config, world_size: int = 1, cuda_available: bool | None = None) -> None:
    """Refuse, before any work starts, every setting that cannot run."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.tp < 1 or p.pp < 1:
        raise ConfigError(f"--tp and --pp must be >= 1 (got tp={p.tp}, pp={p.pp})")
    groups = m.num_query_groups or m.num_attention_heads
    if m.num_attention_heads % p.tp or groups % p.tp:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} (query groups {groups}) is not "
            f"divisible by tp={p.tp}; choose a tp that divides the number of heads"
        )
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_layers % p.pp:
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not divisible by pp={p.pp}; "
            f"choose a pp that divides the number of layers"
        )
    if p.vpp is not None:
        if p.pp < 2 or p.vpp < 2:
            raise ConfigError(f"parallel.vpp={p.vpp} (interleaved pipeline) needs --pp >= 2 and vpp >= 2")
        if m.num_layers % (p.pp * p.vpp):
            raise ConfigError(
                f"model.num_layers={m.num_layers} is not divisible by pp*vpp = {p.pp}*{p.vpp}; "
                f"every virtual stage needs the same number of layers"
            )
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by tp={p.tp}")
    if world_size % (p.tp * p.pp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp} = {p.tp * p.pp}; "
            f"launch a multiple of {p.tp * p.pp} processes (torchrun --nproc-per-node)"
        )
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs --tp > 1")
    if p.sequence_parallel and cfg.data.seq_length % p.tp:
        raise ConfigError(
            f"sequence parallel splits the sequence over tp={p.tp} ranks: "
            f"data.seq_length={cfg.data.seq_length} must be divisible by it"
        )
    if cfg.data.seq_length > m.max_sequence_length:
        raise ConfigError(
            f"data.seq_length={cfg.data.seq_length} exceeds the model's maximum "
            f"model.max_sequence_length={m.max_sequence_length}"
        )
    dp = world_size // (p.tp * p.pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size * data-parallel size = {t.micro_batch_size} * {dp}"
        )
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    if p.vpp is not None and micro % p.pp:
        raise ConfigError(
            f"the interleaved pipeline needs the number of micro-batches per step ({micro} = global batch / "
            f"(micro batch * dp)) to be a multiple of pp={p.pp}; raise train.global_batch_size"
        )
    if t.precision == "bf16" and not cuda_available:
        raise ConfigError(
            "train.precision=bf16 needs a GPU: megatron-core's mixed-precision optimizer only holds CUDA "
            "tensors; use train.precision=auto (fp32 on CPU, bf16 on GPU)"
        )
    if t.iters < 1:
        raise ConfigError(f"train.iters must be >= 1 (got {t.iters})")
    if not 0.0 <= cfg.objective.eps_train < 1.0 or not 0.0 <= cfg.objective.eps_valid < 1.0:
        raise ConfigError("objective.eps_train and objective.eps_valid must lie in [0, 1)")
