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

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional


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
    # How the label embedding joins the time embedding (model/time_embedding.py): silu_sum (the
    # reference DiT: SiLU(time) + SiLU(label)) | sum_silu (SiLU(time + label), checkpoints before the key).
    label_combination: str = "silu_sum"
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
    """Where the samples come from and how they are read (docs/data.md).

    loader: `indexed` (megatron indexed datasets: data_prefix, or a weighted blend in data_path /
        the per-split *_data_path lists, Megatron-LM's `[w1, prefix1, w2, prefix2]` convention),
        `webdataset` (tokenized tar shards streamed with the webdataset library: `shards` names a
        manifest written by tools/preprocess_data.py, or a `[w1, manifest1, ...]` blend of them) or
        `dali` (the same shards read by NVIDIA DALI's webdataset reader).
    streams: shard streams per global batch (webdataset/dali); each data-parallel rank reads
        streams/dp of them, so the batches do not depend on dp for a fixed value. null: the dp size.
    num_workers / prefetch: batches are assembled off the training loop by `num_workers` worker
        processes (0: one background thread) holding up to `prefetch` iterations ready (0 with
        num_workers 0: in the training loop, synchronously).
    document_attention: attention never crosses a document boundary (EOD) inside a packed sample.
    variable_length_fraction: this fraction of samples is cut to a random length in [1, seq_length]
        (LLaDA pre-training: 0.01); the rest of such a sample takes no part in attention or loss.
    format: `text` (pre-training: documents packed into samples) or `sft` (supervised fine-tuning:
        one (prompt, response) example per sample, EOS-padded, with a per-token prompt mask, written
        by `tools/preprocess_data.py --sft`; docs/sft.md).
    """

    name: str = "shakespeare"
    data_prefix: Optional[str] = None  # megatron indexed dataset prefix (<prefix>.bin/.idx)
    data_path: Optional[List[Any]] = None  # blend: [prefix, ...] or [w1, prefix1, w2, prefix2, ...]
    train_data_path: Optional[List[Any]] = None  # per-split blends (then data.split is not used)
    valid_data_path: Optional[List[Any]] = None
    test_data_path: Optional[List[Any]] = None
    loader: str = "indexed"  # indexed | webdataset | dali
    shards: Optional[List[Any]] = None  # webdataset/dali: [manifest] or [w1, manifest1, w2, manifest2, ...]
    shard_url: Optional[str] = None  # where shards are read: a template with {shard}; null: beside the manifest
    streams: Optional[int] = None
    prepare_dir: str = "data_cache/shakespeare"  # where the bundled corpus is prepared
    seq_length: int = 128
    split: str = "90,10,0"
    num_workers: int = 0
    prefetch: int = 2
    document_attention: bool = False
    variable_length_fraction: float = 0.0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    labels: Optional[str] = None  # .npy of one int label per document (model.num_classes > 0)
    format: str = "text"  # text | sft


@dataclass
class ObjectiveConfig:
    """The training objective; see `prosec_mcore/diffusion/losses.py` for the math.

    name: `mdlm` (masked-diffusion loss only) or `proseco` (adds the self-correction term).
    corrector_input: `all` (y = argmax x_theta(z_t) at every position, the reference recipe)
        or `masked` (argmax only at masked positions, clean tokens elsewhere).
    errors_upweighted: where y == x use -w p(x) instead of -w log p(x).
    weighted_corrector_loss: multiply the corrector term by w(t) (reference: true).
    With data.format=sft the same objective learns p(response | prompt): the prompt is never
    masked and never in the loss, and the corrector input keeps it clean (diffusion/sft.py).
    sft_normalization (data.format=sft): `response` (LLaDA's SFT: each example's loss is divided by
        its response length, padding included when it counts, then averaged over examples) or
        `tokens` (the pre-training normaliser: the batch's number of positions).
    sft_pad_in_loss (data.format=sft): the EOS padding after a response is part of the response
        (masked, predicted, counted), as LLaDA's SFT does; false: padding is noised like the
        response but adds nothing to the loss or its normaliser.
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
    sft_normalization: str = "response"  # response | tokens
    sft_pad_in_loss: bool = True


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
    # Megatron-LM's --lr-warmup-init: the rate warm-up starts from (the reference warms up from 1e-6).
    lr_warmup_init: float = 0.0
    # EMA of the weights (training/ema.py): 0 disables; the reference trains with 0.9999 and
    # validates, samples and exports with the EMA weights (so does this project when it is on).
    # ema_warmup: the reference's decay warm-up, min(ema_decay, (1 + n) / (10 + n)) at update n.
    ema_decay: float = 0.0
    ema_warmup: bool = True
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
    # ProSeCo under pipeline parallelism: both passes in one schedule call (one_call), or one call
    # per pass (two_call); auto: one call where y always reaches the first stage in time (step.py).
    proseco_schedule: str = "auto"
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # CUDA graphs: refused for now (validate_config). megatron-core's capture replays a layer's
    # TransformerLayer forward, which would bypass AdaLNTransformerLayer.forward and drop the time
    # conditioning without a word; kept as a key so that Megatron users get that reason, not "unknown key".
    cuda_graph_impl: str = "none"
    # Fused cross-entropy for both ProSeCo losses (diffusion/losses.py: cross_entropy), as
    # Megatron-LM's --cross-entropy-loss-fusion / --cross-entropy-fusion-impl: native (megatron-core's
    # fused kernel; bf16 runs, its backward returns bf16 logit gradients) | te (Transformer Engine).
    cross_entropy_loss_fusion: bool = False
    cross_entropy_fusion_impl: str = "native"
    # The LR schedule on resume (Megatron-LM's flags). Neither: a changed schedule setting is refused,
    # except a longer train.iters, which follows the checkpoint's schedule (training/schedule_resume.py).
    override_opt_param_scheduler: bool = False  # apply this run's schedule settings from the resumed step
    use_checkpoint_opt_param_scheduler: bool = False  # keep the checkpoint's schedule, whatever this run says


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
    """Distributed checkpoints (training/checkpoint.py) and where a run starts (training/lifecycle.py).

    save_dir: None -> <run_dir>/checkpoints. save_interval: iterations between saves (0: no
    periodic saves); save_at_end: save the last iteration too (as Megatron-LM does on exit).
    Where a run starts, in order: `load` (resume exactly this checkpoint: weights, optimizer,
    schedule, iteration), else the newest complete checkpoint of save_dir (`resume`), else
    `pretrained` (initial weights only, iteration 0, fresh optimizer; Megatron-LM's
    --pretrained-checkpoint; the checkpoint's EMA weights when it kept an EMA, as validation used
    them), else a fresh initialisation. So a requeued job started from
    pretrained weights continues from its own checkpoints.
    fallback_to_previous: when the newest checkpoint is corrupt, resume from the previous complete
    one automatically (the corrupt one is renamed aside, and the log says so); off: stop with a
    message naming both.
    SIGTERM / SIGUSR1 (SLURM's pre-emption warnings) and SIGINT (Ctrl-C) make the job save and exit
    cleanly; a second Ctrl-C exits at once.
    async_save: write checkpoints in a background process (megatron-core async torch_dist save);
    a checkpoint becomes COMPLETE and `latest` only once every rank's writer has finished.
    """

    save_dir: Optional[str] = None
    save_interval: int = 0
    save_at_end: bool = True
    keep_last: int = 3
    load: Optional[str] = None
    pretrained: Optional[str] = None
    resume: bool = True
    fallback_to_previous: bool = False
    save_on_exit_signal: bool = True
    async_save: bool = False


@dataclass
class HealthConfig:
    """The healthy-state guard (training/health.py), checked every iteration on every rank alike.

    nonfinite: what a NaN/Inf loss or gradient norm does: `stop` (the update is not applied; the run
        exits with a message naming the iteration; the newest checkpoint stays the healthy one) or
        `skip` (the update is not applied and training goes on, at most `max_skipped` times per run).
    spike_factor: > 0 flags a loss above spike_factor x the mean of the last `spike_window` applied
        iterations' losses; spike_action `warn` prints it, `skip` skips the update (counted in
        max_skipped). 0 turns spike detection off.
    """

    nonfinite: str = "stop"
    max_skipped: int = 10
    spike_factor: float = 0.0
    spike_window: int = 100
    spike_action: str = "warn"


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
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_CHOICES = {
    "model.style": ("dit", "llama"),
    "model.time_conditioning": ("adaln", "none"),
    "model.local_attention": ("sdpa", "unfused"),
    "model.label_combination": ("silu_sum", "sum_silu"),
    "objective.name": ("proseco", "mdlm"),
    "objective.schedule": ("loglinear", "linear", "cosine"),
    "objective.corrector_input": ("all", "masked"),
    "train.lr_decay_style": ("cosine", "constant", "linear"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.fp8": (None, "e4m3", "hybrid"),
    "train.fp8_recipe": ("delayed", "tensorwise"),
    "train.fp8_amax_compute_algo": ("max", "most_recent"),
    "train.recompute_granularity": (None, "full", "selective"),
    "train.proseco_schedule": ("auto", "one_call", "two_call"),
    "train.recompute_method": (None, "uniform", "block"),
    "health.nonfinite": ("stop", "skip"),
    "health.spike_action": ("warn", "skip"),
    "train.cross_entropy_fusion_impl": ("native", "te"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "data.tokenizer.kind": ("hf_json", "gpt2_bpe", "char"),
    "data.loader": ("indexed", "webdataset", "dali"),
    "data.format": ("text", "sft"),
    "objective.sft_normalization": ("response", "tokens"),
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
    _validate_numbers(cfg)
    if t.lr_decay_style != "constant" and t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}: the {t.lr_decay_style} schedule "
                          f"decays from lr to min_lr; lower train.min_lr")
    if cfg.objective.lambda_mdm == 0 and cfg.objective.lambda_sc == 0:
        raise ConfigError("objective.lambda_mdm and objective.lambda_sc are both 0: nothing to train")
    if os.path.exists(cfg.run_dir) and not os.path.isdir(cfg.run_dir):
        raise ConfigError(f"run_dir={cfg.run_dir} is a file, not a directory; choose another run_dir")
    _validate_speed_features(cfg, cuda_available, te_available)
    d = cfg.data
    if d.format == "sft":
        # one (prompt, response) example per sample, EOS-padded (diffusion/sft.py): nothing to pack or cut
        if d.document_attention or d.variable_length_fraction:
            raise ConfigError("data.format=sft holds one example per sample: data.document_attention and "
                              "data.variable_length_fraction do not apply; set them to false / 0")
        if m.num_classes:
            raise ConfigError("data.format=sft has no per-document labels: set model.num_classes=0")
    if te_available and (d.document_attention or d.variable_length_fraction) and t.micro_batch_size != 1:
        # the TE layers take packed documents in the THD format (cu_seqlens), one sample per micro-batch
        raise ConfigError(f"data.document_attention / data.variable_length_fraction on the Transformer Engine "
                          f"layers pack documents as THD sequences of one sample: set train.micro_batch_size=1 "
                          f"(got {t.micro_batch_size})")


# Every number a run reads, with the range it must lie in: (low, high, low inclusive, high inclusive).
# A key missing here is only checked for being finite.
_RANGES = {
    "model.num_layers": (1, None, True, True), "model.hidden_size": (1, None, True, True),
    "model.num_attention_heads": (1, None, True, True), "model.ffn_hidden_size": (1, None, True, True),
    "model.max_sequence_length": (1, None, True, True), "model.time_embedding_dim": (1, None, True, True),
    "model.rotary_base": (0, None, False, True), "model.init_method_std": (0, None, False, True),
    "model.hidden_dropout": (0, 1, True, False), "model.attention_dropout": (0, 1, True, False),
    "model.layernorm_epsilon": (0, None, False, True),
    "data.seq_length": (1, None, True, True), "data.num_workers": (0, None, True, True),
    "data.prefetch": (0, None, True, True), "data.variable_length_fraction": (0, 1, True, True),
    "data.streams": (1, None, True, True),
    "objective.schedule_eps": (0, 1, False, False), "objective.eps_train": (0, 1, True, False),
    "objective.eps_valid": (0, 1, True, False), "objective.lambda_mdm": (0, None, True, True),
    "objective.lambda_sc": (0, None, True, True),
    "train.iters": (1, None, True, True), "train.global_batch_size": (1, None, True, True),
    "train.micro_batch_size": (1, None, True, True), "train.lr": (0, None, False, True),
    "train.min_lr": (0, None, True, True), "train.lr_warmup_iters": (0, None, True, True),
    "train.weight_decay": (0, None, True, True), "train.adam_beta1": (0, 1, True, False),
    "train.adam_beta2": (0, 1, True, False), "train.adam_eps": (0, None, False, True),
    "train.clip_grad": (0, None, True, True), "train.lr_warmup_init": (0, None, True, True),
    "train.ema_decay": (0, 1, True, False), "train.log_interval": (1, None, True, True),
    "train.eval_interval": (0, None, True, True), "train.eval_iters": (1, None, True, True),
    "train.exit_interval": (0, None, True, True),
    "checkpoint.save_interval": (0, None, True, True), "checkpoint.keep_last": (0, None, True, True),
    "health.max_skipped": (0, None, True, True), "health.spike_factor": (0, None, True, True),
    "health.spike_window": (1, None, True, True),
}


def _numbers(node, prefix: str = ""):
    """(dotted key, value) of every int/float field of the config tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def _validate_numbers(cfg: Config) -> None:
    """Refuse, by name, a number that is NaN/Inf or outside the range its key allows."""
    for key, value in _numbers(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number; give a finite value")
        if key not in _RANGES:
            continue
        low, high, low_incl, high_incl = _RANGES[key]
        too_low = low is not None and (value < low if low_incl else value <= low)
        too_high = high is not None and (value > high if high_incl else value >= high)
        if too_low or too_high:
            interval = f"{'[' if low_incl else '('}{low}, {'inf' if high is None else high}{']' if high_incl and high is not None else ')'}"
            raise ConfigError(f"{key}={value} is out of range: it must lie in {interval}")


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
        raise ConfigError(f"train.cuda_graph_impl={t.cuda_graph_impl!r} is refused: megatron-core's CUDA-graph capture "
                          f"replays TransformerLayer.forward, which bypasses the adaLN modulation of "
                          f"AdaLNTransformerLayer and would silently drop the time conditioning; use "
                          f"train.cuda_graph_impl=none (docs/gpu.md)")
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
