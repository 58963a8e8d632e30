"""The ProSeCo DiT in plain PyTorch, for Hugging Face (`AutoModelForMaskedLM`, trust_remote_code).

Parameter names follow the reference checkpoints (backbone.vocab_embed.embedding,
backbone.blocks.N.attn_qkv.weight, ...). The network, per block:

    c = SiLU(MLP(sinusoid(sigma)))                        (sigma := 0 unless time_conditioning)
      + SiLU(E[cond])                                     (cfg: class labels, label_combination
                                                           silu_sum; sum_silu: SiLU(MLP(..) + E[cond]))
    shift/scale/gate x 2 = adaLN_modulation(c)
    h = h + gate_a * drop(attn_out(Attention(rope(attn_qkv(LN(h) * (1 + scale_a) + shift_a)))))
    h = h + gate_m * drop(MLP(LN(h) * (1 + scale_m) + shift_m))
    logits = linear(LN(h) * (1 + scale) + shift)          (final layer, its own adaLN)

Attention is bidirectional; rotary embeddings rotate the two halves of each head (GPT-NeoX
style) of queries and keys. Logits are raw: a diffusion sampler suppresses the mask token.
`drop` is dropout with probability config.dropout, in training mode only (the reference's hidden
dropout). A label-conditioned model (cfg=True) embeds `cond` with cfg_num_classes + 1 rows, the
last being the null label; cond=None means the null label (unconditional), as in training.

The forward takes input_ids (or inputs_embeds), timesteps (sigma, [b]), cond, output_hidden_states
and return_dict as transformers models do, and returns MaskedLMOutput (logits, hidden_states) or
a tuple.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import modeling_outputs

# relative, as transformers loads remote code as a package (its import check, 4.46, reads
# every import outside try blocks as a required package)
from .configuration_proseco import ProsecoConfig


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float = 10_000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, seq_len: int, device):
        t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]  # [1, s, 1, d]


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x):
        return F.layer_norm(x.float(), [self.dim]).to(x.dtype) * self.weight


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DDiTBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim, bias=True), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim, bias=True))
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def attention(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.attn_qkv(x).view(b, s, 3, self.n_heads, -1).unbind(2)  # each [b, s, h, d]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(b, s, -1)

    def forward(self, x, cos, sin, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)
        drop = self.dropout if self.training else 0.0
        attn = self.attn_out(self.attention(modulate(self.norm1(x), shift_a, scale_a), cos, sin))
        x = x + gate_a * F.dropout(attn, p=drop)
        mlp = self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x + gate_m * F.dropout(mlp, p=drop)


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x):
        return self.embedding[x]


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, cond_dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, cond_dim)

    def forward(self, labels):
        return self.embedding_table(labels)


class DITBackbone(nn.Module):
    def __init__(self, config: ProsecoConfig):
        super().__init__()
        self.config = config
        self.combination = getattr(config, "label_combination", "silu_sum")
        if self.combination not in ("silu_sum", "sum_silu"):
            raise NotImplementedError(f"label_combination={self.combination!r} is not implemented")
        self.vocab_embed = EmbeddingLayer(config.hidden_dim, config.vocab_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim)
        # the last row is the null label (unconditional)
        self.cond_map = LabelEmbedder(config.cfg_num_classes + 1, config.cond_dim) if config.cfg else None
        self.rotary_emb = Rotary(config.hidden_dim // config.n_heads)
        self.blocks = nn.ModuleList([DDiTBlock(config.hidden_dim, config.n_heads, config.cond_dim, dropout=config.dropout)
                                     for _ in range(config.n_blocks)])
        self.output_layer = DDitFinalLayer(config.hidden_dim, config.vocab_size, config.cond_dim)

    def condition(self, sigma, cond):
        if not self.config.time_conditioning:
            sigma = torch.zeros_like(sigma)
        time = self.sigma_map(sigma)
        if self.cond_map is None:
            if cond is not None:
                raise ValueError("cond given, but this model has no label embedding (cfg=False)")
            return F.silu(time)
        if cond is None:
            cond = torch.full(sigma.shape, self.config.cfg_num_classes, dtype=torch.long, device=sigma.device)
        label = self.cond_map(cond)
        return F.silu(time) + F.silu(label) if self.combination == "silu_sum" else F.silu(time + label)

    def forward(self, indices, sigma, cond=None, inputs_embeds=None, output_hidden_states=False):
        c = self.condition(sigma, cond)
        x = self.vocab_embed(indices) if inputs_embeds is None else inputs_embeds
        hidden = [x] if output_hidden_states else None
        cos, sin = self.rotary_emb(x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, cos, sin, c)
            if output_hidden_states:
                hidden.append(x)
        return self.output_layer(x, c), (tuple(hidden) if output_hidden_states else None)


class Proseco(transformers.PreTrainedModel):
    config_class = ProsecoConfig
    base_model_prefix = "proseco"

    def __init__(self, config: ProsecoConfig):
        super().__init__(config)
        self.backbone = DITBackbone(config)
        self.post_init()  # transformers' bookkeeping (tied weights, init of missing weights)

    def forward(self, input_ids: torch.LongTensor = None, timesteps: torch.FloatTensor = None,
                cond: torch.LongTensor = None, inputs_embeds: torch.FloatTensor = None,
                output_hidden_states: bool = None, return_dict: bool = None, **kwargs):
        """timesteps: sigma per sequence [b] (None: 0); cond: class labels [b] of a cfg model."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch = input_ids if input_ids is not None else inputs_embeds
        if timesteps is None:
            timesteps = torch.zeros(batch.shape[0], device=batch.device)
        logits, hidden = self.backbone(input_ids, timesteps, cond, inputs_embeds, output_hidden_states)
        if not return_dict:
            return (logits, hidden) if output_hidden_states else (logits,)
        return modeling_outputs.MaskedLMOutput(logits=logits, hidden_states=hidden, loss=None)
