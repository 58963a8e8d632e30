"""Time conditioning: the noise level enters the network through adaLN modulation (DiT).

    c = SiLU( MLP( sinusoidal(sigma) ) )           once per forward, shape [b, D]
    (shift, scale, gate) per sub-block = Linear(c)  zero-initialised, so every block starts
                                                    as the identity and the network learns
                                                    how much to listen to the noise level
    h <- h + gate * F( LN(h) * (1 + scale) + shift )

sigma = -log alpha_t is what the reference backbone receives; `zero_timestep` feeds 0 instead
(the reference OWT recipe), which keeps the adaLN path but makes its output a learned constant.

A label-conditioned model (`model.num_classes` > 0, for classifier-free guidance) adds a learned
embedding of the class label. `model.label_combination` says how it joins the time embedding:
`silu_sum` (default, the reference DiT): c = SiLU(MLP(sinusoidal(sigma))) + SiLU(E[label]);
`sum_silu` (this project before it followed the reference): c = SiLU(MLP(sinusoidal(sigma)) + E[label]).
The two compute different functions of the same weights, so a checkpoint records which one it was
trained with and is refused by a run with the other (checkpoints without the key are `sum_silu`).
Row `num_classes` of E is the "null" label: training replaces the label by it with probability
`objective.cond_dropout`, so one network learns both p(x | z, label) and p(x | z).

Under pipeline parallelism every stage needs c, so every stage holds a copy of the embedder.
The copies start equal (seeded init) and stay equal because their gradients are summed over
the pipeline group before each optimizer step (megatron-core's finalize_model_grads, for
parameters marked `pipeline_parallel`); all but the first stage's
copy are marked `shared` so gradient-norm clipping counts the parameters once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .norms import mark_sequence_parallel

FREQUENCY_DIM = 256


def sinusoidal_embedding(t: torch.Tensor, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """[b] -> [b, dim]: cosines then sines at geometrically spaced frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(torch.nn.Module):
    """sigma [b] (and labels [b]) -> c [b, D]: SiLU(Linear(SiLU(Linear(sinusoidal(sigma))))), with the
    label embedding E[label] joined as `label_combination` says (module docstring)."""

    LABEL_COMBINATIONS = ("silu_sum", "sum_silu")

    def __init__(self, config, embedding_dim: int, seed: int, num_classes: int = 0,
                 label_combination: str = "silu_sum"):
        super().__init__()
        if label_combination not in self.LABEL_COMBINATIONS:
            raise ValueError(f"label_combination must be one of {self.LABEL_COMBINATIONS}, not {label_combination!r}")
        self.num_classes = num_classes
        self.label_combination = label_combination
        self.fc1 = torch.nn.Linear(FREQUENCY_DIM, embedding_dim, dtype=config.params_dtype)
        self.fc2 = torch.nn.Linear(embedding_dim, embedding_dim, dtype=config.params_dtype)
        self.label_embedding = (torch.nn.Embedding(num_classes + 1, embedding_dim, dtype=config.params_dtype)
                                if num_classes else None)
        gen = torch.Generator().manual_seed(seed)  # identical on every rank and stage
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * config.init_method_std)
                layer.bias.zero_()
            if self.label_embedding is not None:
                self.label_embedding.weight.copy_(torch.randn(self.label_embedding.weight.shape, generator=gen)
                                                  * config.init_method_std)
        mark_sequence_parallel(self, config.sequence_parallel)

    def forward(self, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        freq = sinusoidal_embedding(sigma).to(self.fc1.weight.dtype)
        hidden = self.fc2(F.silu(self.fc1(freq)))
        if self.label_embedding is not None:
            if labels is None:  # unconditional: the null label
                labels = torch.full(sigma.shape, self.num_classes, dtype=torch.long, device=sigma.device)
            label = self.label_embedding(labels.to(hidden.device))
            if self.label_combination == "silu_sum":
                return F.silu(hidden) + F.silu(label)
            return F.silu(hidden + label)
        if labels is not None:
            raise ValueError("this model has no label conditioning (model.num_classes=0); drop the labels")
        return F.silu(hidden)


class AdaLNModulation(torch.nn.Module):
    """c [b, D] -> `chunks` modulation vectors, each [1, b, h] (broadcast over the sequence)."""

    def __init__(self, config, embedding_dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = torch.nn.Linear(embedding_dim, chunks * config.hidden_size, dtype=config.params_dtype)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()
        mark_sequence_parallel(self, config.sequence_parallel)

    def forward(self, c: torch.Tensor):
        return self.linear(c).unsqueeze(0).chunk(self.chunks, dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift
