"""Weight initialisation that does not depend on the parallel layout.

Why: megatron draws initial weights from RNG streams whose seeds depend on
the rank (Megatron-LM offsets the seed by ``100 * pipeline_rank``; without
``use_cpu_initialization`` the tensor-parallel stream is offset by
``tp_rank`` too). The same config trained at TP1/PP1 and at TP2/PP2 then
starts from different weights, which makes layouts impossible to compare and
a run impossible to resume on a different layout with the same result.

Idea: give every parameter a *global* identity and derive its values from
that identity alone.

* Global name. A parameter's name inside a model chunk is local: under
  pipeline parallelism stage 1 calls its first layer ``decoder.layers.0``
  although it is layer 3 of the network. megatron stores the global,
  1-based index on each layer as ``layer.layer_number`` (interleaved virtual
  stages included), so ``decoder.layers.<i>`` is renamed to
  ``decoder.layers.<layer_number - 1>``. The copy of a tied word embedding
  that the last pipeline stage keeps as ``output_layer.weight`` (marked
  ``shared_embedding``) is named ``embedding.word_embeddings.weight`` so it
  gets the same values as the original on the first stage.
* Full tensor from a per-name seed. The *full* (unsplit) tensor is drawn on
  CPU in float32 from a generator seeded with ``hash(seed, global name)``,
  using the init function megatron would use for that parameter
  (``embedding_init_method`` for embeddings, ``output_layer_init_method``
  for the output projections ``linear_proj``/``linear_fc2`` and
  ``init_method`` for every other matrix).
* Tensor-parallel slice. Parameters split by tensor parallelism carry
  ``tensor_model_parallel``, ``partition_dim`` and ``partition_stride``;
  this rank keeps the same slice that megatron's own CPU initialisation
  keeps (chunks of ``size / stride`` along ``partition_dim``, every
  ``tp_size``-th chunk starting at ``tp_rank``).
* Only this rank's slice is drawn. For megatron's ``normal_`` init functions
  (all of them in our configs) ``shard_draw.py`` computes the slice directly,
  bit for bit equal to drawing the full tensor and slicing it, in memory
  O(shard + one chunk) (the generator still runs over the full tensor: time
  O(full tensor) per rank). Any other init function, and tensors under 16
  elements (which ``normal_`` draws another way), take the full draw.

What is drawn is decided by name and shape, never by the current values (a
model built with ``model.builder.build_model(..., random_init=False)`` holds
NaN in these matrices): every matrix (dim >= 2) except the
zero-initialised adaLN modulations (``ZERO_INITIALISED``). Vectors (biases and
norm weights, set to constants when the model is built) and the
zero-initialised matrices are already layout-independent and are left as they
are; one that is not constant is an error (it needs a rule here).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable

import torch

from .shard_draw import BLOCK, DEFAULT_CHUNK_ELEMENTS, draw_normal_shard, normal_parameters, shard_pattern

EMBEDDING_NAME = "embedding.word_embeddings.weight"
# Matrices that megatron initialises with config.output_layer_init_method.
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")
# Matrices the ProSeCo model initialises to zero (model/time_embedding.py: AdaLNModulation).
ZERO_INITIALISED = ("adaln_modulation.linear.weight", "final_modulation.linear.weight")


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (they keep the model as `.module`)."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk


def global_parameter_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Map each parameter of one (unwrapped) model chunk to its layout-independent name."""
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    layer_prefixes = {}
    for qualname, module in model.named_modules():
        head, _, index = qualname.rpartition(".")
        if isinstance(module, BaseTransformerLayer) and index.isdigit():
            layer_prefixes[qualname] = f"{head}.{module.layer_number - 1}"

    names = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in layer_prefixes:
                name = ".".join([layer_prefixes[prefix]] + parts[cut:])
                break
        if name == "output_layer.weight" and getattr(param, "shared_embedding", False):
            name = EMBEDDING_NAME
        names[name] = param
    return names


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, a parameter's global name): the same on every rank."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _init_function(config, name: str) -> Callable[[torch.Tensor], None]:
    if name.startswith("embedding."):
        return config.embedding_init_method
    if name.endswith(_OUTPUT_PROJECTIONS):
        return config.output_layer_init_method
    return config.init_method


def full_shape(param: torch.nn.Parameter, tp_size: int) -> list[int]:
    """The unsplit shape of a (possibly tensor-parallel) parameter."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


def tp_slice(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of `full`, split exactly as megatron splits a master weight."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, param.partition_stride
    chunk = param.shape[dim] // stride
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def _draw(init_fn: Callable, shape: list[int], seed: int) -> torch.Tensor:
    """Run `init_fn` on a fresh float32 CPU tensor with the CPU generator seeded by `seed`.

    megatron's init functions draw from the default CPU generator for CPU
    tensors; it is forked so the caller's RNG stream is not disturbed.
    """
    full = torch.empty(shape, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        init_fn(full)
    return full


def is_drawn(name: str, param: torch.Tensor) -> bool:
    """Whether `init_weights_layout_independent` draws parameter `name` (a global or local
    name): every matrix except the zero-initialised ones."""
    return param.dim() >= 2 and not name.endswith(ZERO_INITIALISED)


@torch.no_grad()
def draw_full(param: torch.nn.Parameter, init_fn: Callable, seed: int, tp_rank: int, tp_size: int) -> None:
    """The definition, and the fallback of `draw_parameter`: draw the full tensor, keep this rank's slice."""
    param.copy_(tp_slice(_draw(init_fn, full_shape(param, tp_size), seed), param, tp_rank, tp_size))


@torch.no_grad()
def draw_parameter(param: torch.nn.Parameter, init_fn: Callable, seed: int, tp_rank: int, tp_size: int,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> str:
    """Write this rank's part of the full tensor that `init_fn` draws with the CPU generator
    seeded by `seed`. Returns how: ``shard`` (only this rank's slice was computed) or ``full``
    (`init_fn` is not megatron's normal_, or the tensor has under 16 elements: the full tensor
    was drawn and sliced, as before)."""
    shape = full_shape(param, tp_size)
    normal = normal_parameters(init_fn)
    if normal is None or math.prod(shape) < BLOCK:
        draw_full(param, init_fn, seed, tp_rank, tp_size)
        return "full"
    split = getattr(param, "tensor_model_parallel", False)
    pattern = shard_pattern(shape, param.partition_dim if split else None,
                            param.partition_stride if split else 1, tp_rank, tp_size)
    draw_normal_shard(param, pattern, *normal, seed=seed, chunk_elements=chunk_elements)
    return "shard"


@torch.no_grad()
def init_weights_layout_independent(model_chunks: Iterable[torch.nn.Module], seed: int) -> dict[str, str]:
    """Re-initialise all matrices of `model_chunks` so they equal the TP1/PP1 weights.

    Call after building the model on every rank (before or after wrapping it
    in DDP, before building the optimizer's fp32 copies). Returns, for each
    drawn parameter (global name), ``shard`` or ``full`` (see `draw_parameter`).
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    how = {}
    for chunk in model_chunks:
        model = _unwrap(chunk)
        for name, param in global_parameter_names(model).items():
            if is_drawn(name, param):
                how[name] = draw_parameter(param, _init_function(model.config, name), name_seed(seed, name),
                                           tp_rank, tp_size)
            elif param.numel() > 0 and not bool((param == param.flatten()[0]).all()):
                # Constant initialisations (biases, norm weights, the zero-initialised adaLN
                # modulations) are the same in every layout already.
                raise ValueError(
                    f"init_weights_layout_independent: parameter {name} is not constant; "
                    f"add a rule for it"
                )
    return how
