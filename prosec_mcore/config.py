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
    local_attention: the core attention of the local (non-TE) layers: `sdpa` (PyTorch's fused
            scaled_dot_product_attention, never stores the s x s scores) or `unfused` (megatron-
            core's DotProductAttention). The TE layers always use TE's attention.
    """

    name: str = "tiny"
    style: str = "dit"
    num_layers: int = 8
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 256
    max_sequence_length: int = 128
    # Embedding/output rows (before megatron's padding). None: the tokenizer's vocabulary. It may be
    # larger (LLaDA-8B: 126464 rows, fewer token ids); the rows beyond it are never predicted.
    vocab_size: Optional[int] = None
    time_conditioning: str = "adaln"
    zero_timestep: bool = False
    time_embedding_dim: int = 64  # "cond_dim" of the reference DiT
    num_classes: int = 0  # > 0: class-label conditioning for classifier-free guidance (needs adaln)
    rotary_base: int = 10000
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    local_attention: str = "sdpa"


@dataclass
class TokenizerConfig:
    """kind/path: which tokenizer (data/tokenizer.py). The token names apply to `hf_json` and name
    special tokens that already exist in it, at any id; None keeps the project's defaults
    (<|endoftext|>, <|pad|> or eod, and <|mask|> appended as the last id). LLaDA-8B:
    mask_token="<|mdm_mask|>" (id 126336). With model.vocab_size larger than the tokenizer's
    vocabulary the extra rows are padding the model never predicts."""

    kind: str = "hf_json"  # hf_json | gpt2_bpe | char
    path: Optional[str] = None  # None: the tokenizer prepared with the bundled corpus
    mask_token: Optional[str] = None
    eod_token: Optional[str] = None
    pad_token: Optional[str] = None


@dataclass
class DataConfig:
    name: str = "shakespeare"
    data_prefix: Optional[str] = None  # megatron indexed dataset prefix (<prefix>.bin/.idx)
    prepare_dir: str = "data_cache/shakespeare"  # where the bundled corpus is prepared
    seq_length: int = 128
    split: str = "90,10,0"
    num_workers: int = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    labels: Optional[str] = None  # .npy of one int label per document (model.num_classes > 0)


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
    cond_dropout: float = 0.1  # label-conditioned models: P(label -> null label) per sample


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
    # Save and exit after the iteration during which this file appeared (None: off). The SLURM
    # script (scripts/slurm/) creates it when the time limit nears: unlike a signal, it does not
    # pass through torchrun, which kills its ranks 30 s after forwarding a SIGTERM (docs/gpu.md).
    exit_file: Optional[str] = None
    # FP8 through Transformer Engine (GPU, TE layers; docs/gpu.md): format e4m3 | hybrid (e4m3
    # forward, e5m2 gradients); recipe delayed (scale from an amax history) | tensorwise
    # (current scaling: the scale of each tensor from its own amax). Parameters stay bf16 with
    # fp32 main weights; only the GEMMs of the transformer layers run in FP8.
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1024  # delayed scaling only
    fp8_amax_compute_algo: str = "max"  # delayed scaling only: max | most_recent
    # Activation recomputation (megatron-core): granularity full (whole layers; method uniform |
    # block, recompute_num_layers) or selective (core attention only).
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    cuda_graph_impl: str = "none"  # none | local | transformer_engine (GPU only)
    # Fused cross-entropy for both ProSeCo losses (diffusion/losses.py: cross_entropy), as
    # Megatron-LM's --cross-entropy-loss-fusion / --cross-entropy-fusion-impl: native (megatron-core's
    # fused kernel; bf16 runs, its backward returns bf16 logit gradients) | te (Transformer Engine).
    cross_entropy_loss_fusion: bool = False
    cross_entropy_fusion_impl: str = "native"


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual (interleaved) pipeline stages per pipeline rank
    sequence_parallel: bool = False
    # Data-parallel speed features of megatron-core (training/optim.py). None: on with CUDA, off on
    # CPU (megatron's distributed optimizer holds CUDA tensors only; gloo runs neither overlap).
    use_distributed_optimizer: Optional[bool] = None
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: bool = False  # all-gather updated parameters during the next forward


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (training/checkpoint.py).

    save_dir: None -> <run_dir>/checkpoints. save_interval: iterations between saves (0: no
    periodic saves). A run whose save_dir holds a complete checkpoint resumes from the newest
    one (`resume`); `load` names a checkpoint directory explicitly and wins over `resume`.
    SIGTERM / SIGUSR1 (SLURM's pre-emption warnings) make the job save and exit cleanly.
    async_save: write checkpoints in a background process (megatron-core async torch_dist save);
    a checkpoint becomes COMPLETE and `latest` only once every rank's writer has finished.
    """

    save_dir: Optional[str] = None
    save_interval: int = 0
    keep_last: int = 3
    load: Optional[str] = None
    resume: bool = True
    save_on_exit_signal: bool = True
    async_save: bool = False


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
    "model.local_attention": ("sdpa", "unfused"),
    "objective.name": ("proseco", "mdlm"),
    "objective.schedule": ("loglinear", "linear", "cosine"),
    "objective.corrector_input": ("all", "masked"),
    "train.lr_decay_style": ("cosine", "constant", "linear"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.fp8": (None, "e4m3", "hybrid"),
    "train.fp8_recipe": ("delayed", "tensorwise"),
    "train.fp8_amax_compute_algo": ("max", "most_recent"),
    "train.recompute_granularity": (None, "full", "selective"),
    "train.recompute_method": (None, "uniform", "block"),
    "train.cuda_graph_impl": ("none", "local", "transformer_engine"),
    "train.cross_entropy_fusion_impl": ("native", "te"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "data.tokenizer.kind": ("hf_json", "gpt2_bpe", "char"),
}


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate_config(cfg: Config, world_size: int = 1, cuda_available: bool | None = None,
                    te_available: bool | None = None) -> None:
    """Refuse, before any work starts, every setting that cannot run."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if te_available is None:
        import importlib.util

        te_available = cuda_available and importlib.util.find_spec("transformer_engine") is not None
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            names = ", ".join("null" if a is None else a for a in allowed)
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {names}")
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
    if m.num_classes < 0 or not 0.0 <= cfg.objective.cond_dropout < 1.0:
        raise ConfigError("model.num_classes must be >= 0 and objective.cond_dropout in [0, 1)")
    if m.num_classes and m.time_conditioning != "adaln":
        raise ConfigError(f"model.num_classes={m.num_classes} conditions through adaLN: it needs "
                          f"model.time_conditioning=adaln")
    if bool(m.num_classes) != bool(cfg.data.labels):
        raise ConfigError("label conditioning needs both model.num_classes > 0 and data.labels=<labels.npy> "
                          f"(got num_classes={m.num_classes}, labels={cfg.data.labels})")
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
    _validate_speed_features(cfg, cuda_available, te_available)


def _validate_speed_features(cfg: Config, cuda: bool, te: bool) -> None:
    """FP8, recomputation, CUDA graphs and the data-parallel overlaps (docs/gpu.md)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if t.fp8 is not None:
        if not cuda:
            raise ConfigError(f"train.fp8={t.fp8} needs a GPU with Transformer Engine (FP8 GEMMs are TE CUDA "
                              f"kernels); drop train.fp8 on this machine")
        if not te:
            raise ConfigError(f"train.fp8={t.fp8} needs Transformer Engine, which is not importable here; run in "
                              f"the NGC container of docker/Dockerfile or drop train.fp8")
        if t.precision == "fp32":
            raise ConfigError("train.fp8 runs on bf16 parameters: use train.precision=bf16 (or auto), not fp32")
        for name, size in (("model.hidden_size", m.hidden_size), ("model.ffn_hidden_size / tp", m.ffn_hidden_size // p.tp)):
            if size % 16:
                raise ConfigError(f"train.fp8: FP8 GEMMs need dimensions divisible by 16, but {name} = {size}")
    g = t.recompute_granularity
    per_stage = m.num_layers // p.pp
    if g == "full":
        if t.recompute_method is None or t.recompute_num_layers is None:
            raise ConfigError("train.recompute_granularity=full needs train.recompute_method (uniform|block) "
                              "and train.recompute_num_layers")
        if not 1 <= t.recompute_num_layers <= per_stage:
            raise ConfigError(f"train.recompute_num_layers={t.recompute_num_layers} must lie in [1, {per_stage}] "
                              f"(the layers of one pipeline stage)")
    elif t.recompute_method is not None or t.recompute_num_layers is not None:
        raise ConfigError("train.recompute_method and train.recompute_num_layers apply only to "
                          "train.recompute_granularity=full")
    if t.cuda_graph_impl != "none":
        if not cuda:
            raise ConfigError(f"train.cuda_graph_impl={t.cuda_graph_impl} needs a GPU (CUDA graphs); "
                              f"use train.cuda_graph_impl=none on CPU")
        if t.cuda_graph_impl == "transformer_engine" and not te:
            raise ConfigError("train.cuda_graph_impl=transformer_engine needs Transformer Engine; use local or none")
        if g == "full":
            raise ConfigError("train.cuda_graph_impl with train.recompute_granularity=full: megatron-core graphs "
                              "whole layers, which full recomputation re-runs; choose one of the two")
    if t.cross_entropy_loss_fusion:
        if t.precision == "fp32" or not cuda:
            raise ConfigError("train.cross_entropy_loss_fusion=true is for bf16 runs (a GPU): megatron-core's fused "
                              "kernel returns bf16 logit gradients, which would silently round an fp32 run's; "
                              "leave it off here")
        if t.cross_entropy_fusion_impl == "te" and not te:
            raise ConfigError("train.cross_entropy_fusion_impl=te needs Transformer Engine; use native")
    if p.use_distributed_optimizer and not cuda:
        raise ConfigError("parallel.use_distributed_optimizer=true needs a GPU (megatron-core's distributed "
                          "optimizer holds CUDA tensors only); leave it unset (auto) on CPU")
    if p.overlap_grad_reduce and not cuda:
        raise ConfigError("parallel.overlap_grad_reduce=true needs a GPU (NCCL); on CPU gradients are reduced "
                          "after the backward pass; leave it unset (auto)")
    if p.overlap_param_gather and not (cuda and p.use_distributed_optimizer is not False):
        raise ConfigError("parallel.overlap_param_gather=true needs the distributed optimizer (a GPU and "
                          "parallel.use_distributed_optimizer unset or true)")
