"""Run megatron-core's real code on a CPU-only machine (gloo backend).

megatron-core is written for GPUs. Most of it is plain PyTorch and runs on
CPU unchanged, but some spots hard-code CUDA: buffers allocated with
``device="cuda"`` or ``torch.cuda.current_device()``, ``torch.cuda.synchronize()``
in the pipeline p2p code, an RNG tracker that reads and writes CUDA generator
states, and a ``torch.cuda.FloatTensor`` assert in gradient clipping. On a
CPU-only torch build each of them raises. ``apply_cpu_compat()`` fixes exactly
those spots, so tests run the *real* megatron schedules, p2p, DDP buffers,
optimizer and tensor-parallel layers over gloo. The patches are tied to the
code of one megatron-core version, and it refuses to run on any other.

The patches (as named by ``describe_cpu_compat()``):

``cpu-torch-view:<module>``
    In each module of ``_DEVICE_MODULES`` the global name ``torch`` is
    rebound to a thin view of torch in which ``torch.cuda.current_device()``
    is ``torch.device("cpu")``, ``torch.cuda.synchronize()`` and
    ``empty_cache()`` do nothing, and tensor factories (``zeros``, ``empty``,
    ``tensor``...) turn a CUDA ``device=`` into CPU; everything else is the
    real torch. Only code inside those modules sees the view, and only calls
    that would raise on a CPU-only build behave differently.
``cpu-rng-tracker``
    megatron's ``CudaRNGStatesTracker`` keeps named generator states (the
    tensor-parallel stream, the data-parallel stream...) and ``fork(name)``
    swaps one in for a block of code. On CPU, dropout masks and init weights
    come from the default CPU generator, so our subclass keeps each named
    state as a separate CPU generator state and swaps it in and out of the
    default CPU generator inside ``fork()``: the caller's stream is left as
    it was and successive forks of one name continue one stream. (megatron's
    ``fork`` would warn "CPU RNG state changed within GPU RNG context", which
    is meaningless when the "GPU" generator is the CPU one.) The class name
    that ``initialize_rng_tracker`` instantiates is rebound in
    ``tensor_parallel.random``.
``cpu-rng-get-set``
    ``tensor_parallel.random._get_cuda_rng_state``/``_set_cuda_rng_state``
    use the CPU generator, so activation recomputation
    (``tensor_parallel.checkpoint``) saves and replays RNG state on CPU.
``cpu-clip-grads``
    ``clip_grad_by_total_norm_fp32`` asserts ``param.grad.type() ==
    'torch.cuda.FloatTensor'``; it is replaced (in ``optimizer.clip_grads``
    and ``optimizer.optimizer``, which imported it by name) by a version that
    checks for float32 and scales the grads in place.
``cpu-l2-norm``
    The gradient norm (logged, and used for clipping) comes from megatron's fallback
    ``local_multi_tensor_l2_norm`` when neither TE nor apex is installed: ``torch.norm`` of each
    gradient. PyTorch's CPU kernel for it accumulates in float32 without pairwise summation and
    loses accuracy with size: measured 7e-6 relative error on 262k elements and 1.5e-4 on 4M, which
    made the logged norm of the tiny model 1.0e-5 lower than the float64 norm of the very same
    gradients. ``clip_grads.l2_norm_impl`` is replaced by a sum of squares per tensor (torch's
    pairwise float32 ``sum``) accumulated in float64. On a GPU, TE's/apex's kernels and CUDA's
    reductions are unaffected.
``cpu-tied-embedding-setup``
    ``LanguageModule.setup_embeddings_and_output_layer`` calls
    ``weight.data.cuda()`` before all-reducing a tied embedding between the
    first and last pipeline stage; while that one method runs,
    ``Tensor.cuda`` returns the tensor itself.

Asynchronous checkpoint saves (``checkpoint.async_save``) need only the torch
view of ``dist_checkpointing.strategies.async_utils``: its ``TemporalAsyncCaller``
calls ``torch.cuda.synchronize()`` before forking the writer, and the
collective "is every rank's writer done" check and the finalisation check
all-reduce int tensors created on ``torch.cuda.current_device()``. The fork
itself works on CPU and is what makes the save consistent there: the writer
gets a copy-on-write snapshot of parameters that training then updates in
place (on CPU megatron's "preload to host" step is ``tensor.to("cpu")``, which
returns the live tensor, not a copy). megatron's ``PersistentAsyncCaller`` is
not usable on CPU: its spawned worker calls ``torch.cuda.set_device``, and CPU
tensors sent through its queue are moved to shared memory, i.e. the worker
would read the live, changing parameters. prosec uses the non-persistent queue.

Not patched on purpose: the distributed optimizer (rejects non-CUDA tensors;
use ``use_distributed_optimizer=False``), overlapped grad reduction (CUDA
streams; keep ``overlap_grad_reduce=False``), ``enable_autocast``,
``tensor_parallel.broadcast_data`` (calls ``.cuda()``), CUDA graphs,
inference KV caches, Transformer Engine.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Callable

import torch

SUPPORTED_MEGATRON_VERSION = "0.16.1"

# megatron modules whose `torch` global is replaced by the CPU view, and why.
_DEVICE_MODULES = {
    "megatron.core.utils": "global memory buffer, local multi-tensor l2 norm",
    "megatron.core.tensor_parallel.layers": "weights when not use_cpu_initialization, SP grads",
    "megatron.core.tensor_parallel.mappings": "sequence-parallel gather/scatter outputs",
    "megatron.core.tensor_parallel.utils": "split/gather 1-D buffers",
    "megatron.core.transformer.utils": "default causal attention mask",
    "megatron.core.transformer.dot_product_attention": "softmax offsets",
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "rope frequencies",
    "megatron.core.distributed.param_and_grad_buffer": "contiguous grad buffers",
    "megatron.core.optimizer.optimizer": "loss scale / found-inf tensors",
    "megatron.core.optimizer.clip_grads": "grad-norm reduction tensors",
    "megatron.core.pipeline_parallel.schedules": "token counters",
    "megatron.core.pipeline_parallel.p2p_communication": "shape buffers, synchronize",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "checkpoint write: synchronize",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "checkpoint plan-reuse / failure flags",
    "megatron.core.dist_checkpointing.strategies.async_utils": "async save: synchronize before fork, done flags",
}

_APPLIED: list[str] = []


def _is_cuda_device(device: Any) -> bool:
    """True for "cuda", "cuda:1", torch.device("cuda"), and bare ints (CUDA ordinals)."""
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_factory(factory: Callable) -> Callable:
    """Wrap a torch tensor factory so that a CUDA `device=` becomes CPU."""

    @functools.wraps(factory)
    def on_cpu(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return on_cpu


class _CudaOnCpu:
    """Stands in for `torch.cuda` inside a patched megatron module."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None) -> None:
        """CPU ops complete synchronously: nothing to wait for."""

    empty_cache = staticmethod(lambda: None)  # no CUDA caching allocator to empty

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """Stands in for the `torch` module inside a patched megatron module."""

    cuda = _CudaOnCpu()
    empty = staticmethod(_cpu_factory(torch.empty))
    zeros = staticmethod(_cpu_factory(torch.zeros))
    ones = staticmethod(_cpu_factory(torch.ones))
    full = staticmethod(_cpu_factory(torch.full))
    tensor = staticmethod(_cpu_factory(torch.tensor))
    arange = staticmethod(_cpu_factory(torch.arange))

    def __getattr__(self, name: str):
        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch as seen by megatron on CPU (prosec_mcore.runtime.cpu_compat)>"


_TORCH_ON_CPU = _TorchOnCpu()


def _patch_device_module(module_name: str) -> str:
    module = importlib.import_module(module_name)
    if module.__dict__.get("torch") is not torch:
        raise RuntimeError(f"cpu_compat: {module_name}.torch is not the torch module; cannot patch")
    module.torch = _TORCH_ON_CPU
    return f"cpu-torch-view:{module_name} ({_DEVICE_MODULES[module_name]})"


def _make_cpu_rng_tracker_class(random_module) -> type:
    base = random_module.CudaRNGStatesTracker
    default_name = random_module._MODEL_PARALLEL_RNG_TRACKER_NAME

    class CpuRNGStatesTracker(base):
        """megatron's RNG tracker with CPU generator states.

        Each named state is a CPU generator state (the byte tensor of
        `torch.get_rng_state()`); `fork(name)` swaps it into the default
        CPU generator and swaps the caller's state back on exit.
        """

        def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
            if use_cudagraphable_rng:
                raise NotImplementedError("cudagraph-safe RNG is CUDA-only")
            super().__init__(False, is_inference_rng_tracker)

        def add(self, name, seed):
            """Start a new named stream seeded with `seed` (seeds and names must be unique)."""
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=default_name):
            """Draw from stream `name` inside the block; restore the caller's stream after."""
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_name = self._current_state_name
            outer_state = torch.get_rng_state()
            if outer_name != "default-rng":  # nested fork: park the outer stream
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(
                        f"current state name {self._current_state_name} is not the same as "
                        f"the desired state name {name}."
                    )
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _patch_rng_tracker() -> str:
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker_class = _make_cpu_rng_tracker_class(random_module)
    random_module.CudaRNGStatesTracker = tracker_class
    # A tracker built before the patch would hold CUDA states: drop it so the
    # next get_cuda_rng_tracker() builds a CPU one.
    existing = random_module._CUDA_RNG_STATE_TRACKER
    if existing is not None and not isinstance(existing, tracker_class):
        random_module._CUDA_RNG_STATE_TRACKER = None
        random_module._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    return "cpu-rng-tracker (named RNG streams are separate CPU generator states)"


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    """CPU stand-in for `_get_cuda_rng_state`: the device generator is the CPU one."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe=False) -> None:
    """CPU stand-in for `_set_cuda_rng_state`."""
    torch.set_rng_state(new_state)


def _patch_rng_get_set() -> str:
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    random_module._get_cuda_rng_state = _cpu_get_rng_state
    random_module._set_cuda_rng_state = _cpu_set_rng_state
    return "cpu-rng-get-set (activation recompute saves/restores the CPU generator)"


def _make_cpu_clip(clip_grads_module) -> Callable:
    to_local = clip_grads_module.to_local_if_dtensor

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        """Scale fp32 grads in place by max_norm / total_norm when that is < 1 (CPU version)."""
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [
            to_local(getattr(p, attr)).detach()
            for p in parameters
            if getattr(p, attr, None) is not None
        ]
        allowed = (torch.float32, torch.bfloat16) if use_decoupled_grad else (torch.float32,)
        for grad in grads:
            if grad.dtype not in allowed:
                raise AssertionError(f"clip_grad_by_total_norm_fp32: grad dtype {grad.dtype}")
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for grad in grads:
                grad.mul_(clip_coeff)

    return clip_grad_by_total_norm_fp32


def _patch_clip_grads() -> str:
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    cpu_clip = _make_cpu_clip(clip_grads)
    clip_grads.clip_grad_by_total_norm_fp32 = cpu_clip
    optimizer.clip_grad_by_total_norm_fp32 = cpu_clip
    return "cpu-clip-grads (clip_grad_by_total_norm_fp32 without the torch.cuda.FloatTensor assert)"


def _accurate_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron's local_multi_tensor_l2_norm: the L2 norm of all tensors of
    tensor_lists[0], each tensor's sum of squares in float32 pairwise summation, summed in float64."""
    total = sum(float(t.float().square().sum()) for t in tensor_lists[0])
    return torch.tensor([total ** 0.5], dtype=torch.float), None


def _patch_l2_norm() -> str:
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    if clip_grads.l2_norm_impl.__name__ != "local_multi_tensor_l2_norm":  # TE or apex: their own kernel
        return "cpu-l2-norm (not needed: TE/apex multi-tensor kernel in use)"
    clip_grads.l2_norm_impl = _accurate_l2_norm
    return "cpu-l2-norm (gradient norm summed accurately; torch.norm's CPU kernel loses 1e-5..1e-4)"


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _patch_tied_embedding_setup() -> str:
    module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    original = module.LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    module.LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
    return "cpu-tied-embedding-setup (Tensor.cuda is a no-op while tying embeddings across stages)"


def _check_megatron_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != SUPPORTED_MEGATRON_VERSION:
        raise RuntimeError(
            f"prosec_mcore.runtime.cpu_compat was written for megatron-core "
            f"{SUPPORTED_MEGATRON_VERSION} but megatron-core {package_info.__version__} is "
            f"installed; re-read the patched sources and update the patches before running on CPU."
        )


def apply_cpu_compat() -> list[str]:
    """Apply every CPU patch once (no-op when CUDA is available); return their names."""
    if torch.cuda.is_available() or _APPLIED:
        return list(_APPLIED)
    _check_megatron_version()
    applied = [_patch_device_module(name) for name in _DEVICE_MODULES]
    applied.append(_patch_rng_tracker())
    applied.append(_patch_rng_get_set())
    applied.append(_patch_clip_grads())
    applied.append(_patch_l2_norm())
    applied.append(_patch_tied_embedding_setup())
    _APPLIED.extend(applied)
    return list(_APPLIED)


def describe_cpu_compat() -> list[str]:
    """Names (with a short reason) of the CPU patches applied in this process."""
    return list(_APPLIED)
