"""Evidence that a GPU feature really ran, for tests/gpu: a comparison between two runs passes
trivially when the feature under test never engaged (a zero loss gap, logits that agree because
both sides ran the same code), so each GPU test also checks a trace the feature leaves.

* `CallSpy` / `cross_entropy_spies`: count calls of the cross-entropy kernels at the place
  where `prosec_mcore.diffusion.losses.cross_entropy` looks them up (megatron-core's fused
  `fused_vocab_parallel_cross_entropy`, Transformer Engine's `te_parallel_cross_entropy`, the
  plain `vocab_parallel_cross_entropy`).
* `te_census` / `assert_te_layers`: which modules of a model are Transformer Engine's (any class
  in the module's MRO defined in a `transformer_engine.*` module).
* `FP8Recorder`, `fp8_evidence`, `check_fp8_evidence`, `assert_fp8_engaged`: whether the TE linears
  ran their forward with FP8 on (the module's `fp8` flag, which TE sets in every forward from
  `FP8GlobalStateManager.is_fp8_enabled()`), the recipe TE recorded in `module.fp8_meta["recipe"]`,
  and the recipe's state: for delayed scaling a non-zero amax history in
  `fp8_meta["scaling_fwd" / "scaling_bwd"].amax_history`; current (tensorwise) scaling keeps no
  history, its trace is the recipe and the quantizer objects (`module.quantizers["scaling_fwd"]`,
  `Float8CurrentScalingQuantizer`).
* `fp8_logit_effect`: the same weights, the same input, one forward with FP8 and one without
  (megatron-core reads `config.fp8` at every forward): FP8 must change the logits a little.
* `train_and_probe`: a worker for tests/distributed/launch.py (one fresh process per training
  run, since the Trainer starts torch.distributed and megatron's groups itself): installs the
  spies and the recorder, runs `Trainer(cfg).train()`, writes the evidence as JSON.

Only attributes that TE 1.x and 2.x (2.2 to 2.20 checked) both have are read; where one is
missing the check fails with a message that names it instead of passing silently.
Everything here except the TE-specific attribute values runs on CPU
(tests/unit/test_gpu_features.py tests it with fake TE modules and a CPU training run).
"""
from __future__ import annotations

import functools
import importlib
import json
import types

import torch

# The layer submodules that the TE spec (prosec_mcore/model/layer_specs.py) builds from TE classes.
TE_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
TE_ATTENTION = ("self_attention.core_attention",)

# Where losses.cross_entropy finds each implementation (it imports the fused ones at call time
# from these modules, the plain one at import time into its own namespace).
CROSS_ENTROPY_KERNELS = {
    "none": ("megatron.core.tensor_parallel", "vocab_parallel_cross_entropy"),
    "native": ("megatron.core.fusions.fused_cross_entropy", "fused_vocab_parallel_cross_entropy"),
    "te": ("megatron.core.extensions.transformer_engine", "te_parallel_cross_entropy"),
    # Transformer Engine's own function, which megatron-core's te_parallel_cross_entropy calls.
    "te_kernel": ("megatron.core.extensions.transformer_engine", "parallel_cross_entropy"),
}


# ---------------------------------------------------------------------------------------- spies
class CallSpy:
    """Replace `module.name` by a wrapper that counts calls, and every other reference to the same
    function object in the modules `also_in` (a `from x import f` copy). `restore()` undoes it."""

    def __init__(self, module, name: str, also_in=()):
        self.module = importlib.import_module(module) if isinstance(module, str) else module
        self.name = name
        self.original = getattr(self.module, name, None)
        if not callable(self.original):
            raise RuntimeError(f"{self.module.__name__}.{name} is {self.original!r}: there is no function to spy on")
        self.calls = 0
        original = self.original

        @functools.wraps(original)
        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        self.wrapper = counting
        self._patched = [(self.module, name)]
        setattr(self.module, name, counting)
        for other in also_in:
            for attr, value in list(vars(other).items()):
                if value is original:
                    setattr(other, attr, counting)
                    self._patched.append((other, attr))

    def restore(self) -> None:
        for owner, attr in self._patched:
            if getattr(owner, attr, None) is self.wrapper:
                setattr(owner, attr, self.original)
        self._patched = []


def cross_entropy_spies() -> dict:
    """{impl: CallSpy} for every cross-entropy implementation importable here ('te' and
    'te_kernel' need TE: without it megatron-core sets `te_parallel_cross_entropy = None` and
    imports no `parallel_cross_entropy`; they are left out)."""
    from prosec_mcore.diffusion import losses

    spies = {}
    for impl, (module, name) in CROSS_ENTROPY_KERNELS.items():
        try:
            target = importlib.import_module(module)
        except ImportError:
            continue
        if getattr(target, name, None) is not None:
            spies[impl] = CallSpy(target, name, also_in=[losses])
    return spies


# ------------------------------------------------------------------------------ TE census
def is_te_module(module) -> bool:
    """A module whose class (or a base class) is defined in Transformer Engine."""
    return any(cls.__module__.split(".")[0] == "transformer_engine" for cls in type(module).__mro__)


def te_census(model) -> dict:
    """{qualified name: class name} of the Transformer Engine modules of `model`."""
    return {name: type(m).__name__ for name, m in model.named_modules() if is_te_module(m)}


def _layer_submodules(model, suffixes) -> dict:
    return {name: m for name, m in model.named_modules() if any(name.endswith("." + s) for s in suffixes)}


def assert_te_layers(model, num_layers: int | None = None) -> str:
    """Every transformer layer's QKV, output projection, both MLP linears and core attention are
    Transformer Engine modules (each of the five found `num_layers` times, when given); returns a
    one-line summary for the log."""
    wanted = _layer_submodules(model, TE_LINEARS + TE_ATTENTION)
    if not wanted:
        raise AssertionError("no transformer-layer submodules (" + ", ".join(TE_LINEARS + TE_ATTENTION)
                             + ") found in the model: cannot tell which layers run")
    found = {s: sum(n.endswith("." + s) for n in wanted) for s in TE_LINEARS + TE_ATTENTION}
    missing = {s: k for s, k in found.items() if k == 0 or (num_layers is not None and k != num_layers)}
    not_te = {name: type(m).__name__ for name, m in wanted.items() if not is_te_module(m)}
    if missing or not_te:
        raise AssertionError(f"the layers are not Transformer Engine's: not TE {not_te}, counts off "
                             f"{missing} (expected {num_layers or 'at least 1'} each)")
    classes = sorted({type(m).__name__ for m in wanted.values()})
    return f"{len(wanted)} TE modules in the layers ({', '.join(classes)})"


# ------------------------------------------------------------------------------------- FP8
def _fp8_global_state():
    """TE's FP8GlobalStateManager (transformer_engine.pytorch.quantization since TE 2.11,
    transformer_engine.pytorch.fp8 before), or None."""
    for name in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            return importlib.import_module(name).FP8GlobalStateManager
        except (ImportError, AttributeError):
            continue
    return None


def describe_recipe(recipe) -> str | None:
    """'delayed', 'tensorwise' (per-tensor current scaling), another recipe's class name, or None."""
    if recipe is None:
        return None
    for method, label in (("delayed", "delayed"), ("float8_current_scaling", "tensorwise")):
        check = getattr(recipe, method, None)
        if callable(check):
            try:
                if check():
                    return label
            except TypeError:
                pass
    name = type(recipe).__name__
    if "Delayed" in name:
        return "delayed"
    if "CurrentScaling" in name:
        return "tensorwise"
    return name


def fp8_linears(model) -> dict:
    """{name: module} of the layers' linears that carry TE's FP8 state (`fp8_meta`)."""
    return {n: m for n, m in _layer_submodules(model, TE_LINEARS).items() if hasattr(m, "fp8_meta")}


class FP8Recorder:
    """Forward hooks on the FP8-capable linears: per module, how many forwards ran and in how many
    FP8 was on. TE sets `module.fp8` from the global FP8 state at the start of every forward; where
    a TE version lacks the flag, the global state seen by a pre-hook counts instead."""

    def __init__(self, models):
        self.counts: dict = {}
        self._handles = []
        state = _fp8_global_state()
        for i, model in enumerate(models):
            for name, module in fp8_linears(model).items():
                key = f"{i}:{name}" if len(models) > 1 else name
                self.counts[key] = {"forwards": 0, "fp8_forwards": 0}
                self._handles.append(module.register_forward_pre_hook(self._pre(module, state)))
                self._handles.append(module.register_forward_hook(self._post(key)))

    @staticmethod
    def _pre(module, state):
        def hook(mod, args):
            mod.__dict__["_prosec_fp8_global"] = bool(state.is_fp8_enabled()) if state is not None else None
        return hook

    def _post(self, key):
        def hook(mod, args, output):
            flag = getattr(mod, "fp8", None)
            if flag is None:
                flag = mod.__dict__.get("_prosec_fp8_global")
            self.counts[key]["forwards"] += 1
            self.counts[key]["fp8_forwards"] += int(bool(flag))
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _nonzero(tensor) -> int:
    return int(torch.count_nonzero(tensor).item()) if isinstance(tensor, torch.Tensor) else -1


def fp8_state(module) -> dict:
    """What one TE module's FP8 state shows (JSON-able). -1: the attribute does not exist."""
    meta = getattr(module, "fp8_meta", None) or {}
    out = {"fp8": getattr(module, "fp8", None), "recipe": describe_recipe(meta.get("recipe")),
           "meta_keys": sorted(str(k) for k in meta)}
    for key in ("scaling_fwd", "scaling_bwd"):
        state = meta.get(key)
        out[f"{key}_state"] = type(state).__name__ if state is not None else None
        out[f"{key}_amax_nonzero"] = _nonzero(getattr(state, "amax_history", None))
        quantizers = (getattr(module, "quantizers", None) or {}).get(key) or []
        if isinstance(quantizers, dict):
            quantizers = list(quantizers.values())
        out[f"{key}_quantizers"] = sorted({type(q).__name__ for q in quantizers})
        # TE <= 2.1x current-scaling quantizers keep the last amax in a buffer; newer ones do not.
        out[f"{key}_quantizer_amax_nonzero"] = sum(max(_nonzero(getattr(q, "amax", None)), 0) for q in quantizers)
    return out


def fp8_evidence(model, recorder: FP8Recorder | None = None) -> dict:
    """The FP8 trace of a model after training, JSON-able: per linear, `fp8_state` plus the
    recorder's forward counts."""
    modules = {name: fp8_state(m) for name, m in fp8_linears(model).items()}
    if recorder is not None:
        for name, state in modules.items():
            state.update(recorder.counts.get(name, {"forwards": 0, "fp8_forwards": 0}))
    return {"linears": modules}


def check_fp8_evidence(evidence: dict, recipe: str) -> str:
    """Raise AssertionError unless every FP8-capable linear shows that FP8 ran with `recipe`
    ('delayed' or 'tensorwise'); returns a one-line summary."""
    modules = evidence.get("linears", {})
    if not modules:
        raise AssertionError("no Transformer Engine linear with FP8 state (fp8_meta) in the layers: FP8 cannot "
                             "have run (are the layers TE's?)")
    problems = []
    for name, s in modules.items():
        if "forwards" in s and (s["forwards"] == 0 or s["fp8_forwards"] != s["forwards"]):
            problems.append(f"{name}: {s['fp8_forwards']} of {s['forwards']} training forwards ran with FP8 on")
        if s["recipe"] != recipe:
            problems.append(f"{name}: fp8_meta['recipe'] is {s['recipe']!r}, not {recipe!r}"
                            + (" (TE never initialised FP8 here)" if s["recipe"] is None else ""))
        if recipe == "delayed":
            for key in ("scaling_fwd", "scaling_bwd"):
                if s[f"{key}_amax_nonzero"] == -1:
                    problems.append(f"{name}: fp8_meta has no {key}.amax_history (keys {s['meta_keys']})")
                elif s[f"{key}_amax_nonzero"] == 0:
                    problems.append(f"{name}: fp8_meta['{key}'].amax_history is all zero: no FP8 cast recorded")
        elif recipe == "tensorwise":
            quantizers = s["scaling_fwd_quantizers"]
            if not quantizers or not all("CurrentScaling" in q for q in quantizers):
                problems.append(f"{name}: forward quantizers {quantizers}, expected Float8CurrentScalingQuantizer")
            if s["scaling_fwd_state"] is not None and "Delayed" in s["scaling_fwd_state"]:
                problems.append(f"{name}: fp8_meta['scaling_fwd'] is {s['scaling_fwd_state']} (delayed-scaling state)")
    if problems:
        raise AssertionError(f"FP8 ({recipe}) did not engage: " + "; ".join(problems[:6])
                             + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""))
    forwards = sum(s.get("fp8_forwards", 0) for s in modules.values())
    return f"{len(modules)} TE linears ran FP8 ({recipe})" + (f", {forwards} FP8 forwards in all" if forwards else "")


def assert_fp8_engaged(model, recipe: str, recorder: FP8Recorder | None = None) -> str:
    """`check_fp8_evidence` on a live model."""
    return check_fp8_evidence(fp8_evidence(model, recorder), recipe)


def _configs_with_fp8(model) -> list:
    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "fp8"):
            seen[id(config)] = config
    return list(seen.values())


@torch.no_grad()
def fp8_logit_effect(model, vocab: int, seq: int = 128, batch: int = 2) -> dict:
    """Logits of the same weights and input with FP8 as configured and with FP8 off (megatron-core
    reads `config.fp8` at every forward; every module's config is switched, then restored), and a
    second FP8-off forward as the run-to-run baseline. Returns the relative differences."""
    from tests.compare import relative_error

    configs = _configs_with_fp8(model)
    saved = [c.fp8 for c in configs]
    was_training = model.training
    device = next(model.parameters()).device
    tokens = (torch.arange(batch * seq, device=device).reshape(batch, seq) * 7) % vocab
    sigma = torch.linspace(0.2, 2.0, batch, device=device)
    model.eval()
    try:
        as_configured = model(tokens, sigma=sigma).float()
        for c in configs:
            c.fp8 = None
        off = model(tokens, sigma=sigma).float()
        off_again = model(tokens, sigma=sigma).float()
    finally:
        for c, value in zip(configs, saved):
            c.fp8 = value
        model.train(was_training)
    return {"fp8": saved[0] if saved else None, "configured_vs_off": relative_error(as_configured, off),
            "off_repeat": relative_error(off_again, off)}


def check_fp8_logit_effect(effect: dict, upper: float = 0.2) -> str:
    """FP8 must change the logits (by more than ten times the forward's run-to-run difference),
    but stay close to them: wrong scaling gives O(1) errors or non-finite logits."""
    gap, noise = effect["configured_vs_off"], effect["off_repeat"]
    if not gap > 0 or not gap > 10 * noise:
        raise AssertionError(f"FP8 did not change the logits: relative difference {gap:.3e} with train.fp8="
                             f"{effect['fp8']} vs off (run-to-run {noise:.3e}): the FP8 GEMMs did not run")
    if not gap < upper:
        raise AssertionError(f"FP8 logits differ from the same forward without FP8 by {gap:.3e} (> {upper}): "
                             f"wrong scaling or overflow")
    return f"FP8 changes the logits by {gap:.2e} (run-to-run {noise:.1e})"


# ---------------------------------------------------------------------------------- worker
def train_and_probe(overrides_json: str, out_path: str) -> None:
    """Worker (tests/distributed/launch.py, a fresh process): train with the given overrides while
    counting cross-entropy kernel calls and FP8 forwards, then write the evidence to `out_path`."""
    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    from prosec_mcore.config_loader import load_config
    from prosec_mcore.training.trainer import Trainer

    cfg = load_config(json.loads(overrides_json))
    spies = cross_entropy_spies()
    trainer = Trainer(cfg)
    models = [chunk.module for chunk in trainer.model]
    recorder = FP8Recorder(models)
    try:
        trainer.train()
    finally:
        recorder.remove()
        for spy in spies.values():
            spy.restore()
    model = models[0]
    evidence = {
        "backend": getattr(model, "backend", None),
        "cross_entropy_calls": {impl: spy.calls for impl, spy in spies.items()},
        "te_census": te_census(model),
        "fp8": fp8_evidence(model, recorder),
    }
    try:
        evidence["te_layers"] = assert_te_layers(model)
    except AssertionError as err:
        evidence["te_layers"] = None
        evidence["te_layers_error"] = str(err)
    if trainer.cfg.train.fp8:  # after fp8_evidence: a forward without FP8 resets TE's per-module flags
        evidence["fp8_logit_effect"] = fp8_logit_effect(model, model.vocab_size, seq=trainer.cfg.data.seq_length)
    with open(out_path, "w") as f:
        json.dump(evidence, f, indent=1)
    print(f"[probe] {json.dumps({k: evidence[k] for k in ('backend', 'cross_entropy_calls')})}", flush=True)


def read_evidence(path) -> dict:
    with open(path) as f:
        return json.load(f)


def fake_te_class(name: str, base=torch.nn.Module):
    """A class that looks like Transformer Engine's to `is_te_module` (for CPU tests)."""
    return types.new_class(name, (base,), {}, lambda ns: ns.update(__module__="transformer_engine.pytorch.fake"))
