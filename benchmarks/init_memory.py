"""Host memory and time to build and initialise a model on one rank, before and after the
shard-only initialisation (runtime/shard_draw.py) and `build_model(..., random_init=False)`.

    .venv/bin/python benchmarks/init_memory.py [--model 1b] [--vocab 32000] [--tp 1 8] [--arithmetic 8b:126464]

Each measured case runs in its own process; `peak RSS` is that process's ru_maxrss, `base RSS` its
resident memory after the imports, before the parameters exist; `transient` = peak - base -
parameters is what building and initialising holds on top of the parameters themselves.

  before  megatron's random init at construction (perform_initialization=True; on CPU megatron
          draws every weight's FULL master tensor and keeps its slice), then the previous
          init_weights_layout_independent: the full float32 tensor of every matrix, then the slice
  after   build_model(random_init=False), then init_weights_layout_independent (this rank's
          slice only, in 16 MiB chunks)

TP=1 builds the real model (fp32 on CPU). TP>1 is simulated in one process: the parameters of
rank 0 (their shapes and tensor-parallel attributes come from a meta-device build of the model),
filled as the two paths fill them at that TP size (megatron's `_initialize_affine_weight_cpu` for
rank 0 for the construction, `draw_full` / `draw_parameter` for the init).

`--arithmetic NAME:VOCAB` prints, from a meta-device build of configs/model/NAME.yaml, what each
rank allocates on the host to initialise (no tensor is allocated): the largest transient buffer
and the total drawn, before and after, at several TP sizes, for bf16 parameters on a GPU
(megatron then draws its own init on the device; the previous init drew every full tensor on
the host) and on CPU (megatron's full master per weight as well).
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SEED = 1234


def model_config(name: str, tp: int = 1):
    import yaml

    from prosec_mcore.config import Config, ModelConfig

    with open(os.path.join(ROOT, "configs", "model", f"{name}.yaml")) as f:
        fields = yaml.safe_load(f)
    cfg = Config()
    cfg.model = ModelConfig(**fields)
    cfg.train.precision = "fp32"
    cfg.parallel.tp = tp
    return cfg


def census(name: str, vocab: int) -> list[dict]:
    """Every parameter of the TP1 model (a meta-device build: nothing allocated): global name,
    full shape, split dim / stride, whether the init draws it, and its init function."""
    import torch

    from prosec_mcore.model.builder import build_model
    from prosec_mcore.runtime import initialize_distributed
    from prosec_mcore.runtime.init import _init_function, global_parameter_names, is_drawn

    initialize_distributed(tp=1, pp=1, seed=SEED)
    with torch.device("meta"):
        model = build_model(model_config(name), vocab, backend="local", random_init=False)
    rows = []
    for global_name, p in global_parameter_names(model).items():
        split = getattr(p, "tensor_model_parallel", False)
        rows.append(dict(name=global_name, shape=list(p.shape), dim=p.partition_dim if split else None,
                         stride=p.partition_stride if split else 1, drawn=is_drawn(global_name, p),
                         init=_init_function(model.config, global_name)))
    return rows


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_tp1(name: str, vocab: int, mode: str) -> dict:
    """The real TP1 model: build (megatron's init or not), then the layout-independent init."""
    import torch

    from prosec_mcore.model.builder import build_model
    from prosec_mcore.runtime import initialize_distributed
    from prosec_mcore.runtime.init import (_init_function, draw_full, global_parameter_names,
                                           init_weights_layout_independent, is_drawn, name_seed)

    initialize_distributed(tp=1, pp=1, seed=SEED)
    base = rss_bytes()
    begin = time.perf_counter()
    model = build_model(model_config(name), vocab, backend="local", random_init=mode == "before")
    built = time.perf_counter()
    if mode == "after":
        init_weights_layout_independent([model], SEED)
    else:  # the previous init: every matrix drawn in full (at TP1 the slice is the whole tensor)
        with torch.no_grad():
            for global_name, p in global_parameter_names(model).items():
                if is_drawn(global_name, p):
                    draw_full(p, _init_function(model.config, global_name), name_seed(SEED, global_name), 0, 1)
    done = time.perf_counter()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return dict(build_s=built - begin, init_s=done - built, base_rss=base, param_bytes=params)


def run_simulated(name: str, vocab: int, mode: str, tp: int) -> dict:
    """Rank 0 of `tp`: its shards of every parameter, filled as construction + init would."""
    import torch
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    from prosec_mcore.runtime.init import draw_full, draw_parameter, name_seed

    rows = census(name, vocab)
    base = rss_bytes()
    params = []
    for row in rows:
        local = list(row["shape"])
        if row["dim"] is not None:
            local[row["dim"]] //= tp
        p = torch.nn.Parameter(torch.empty(local))
        if row["dim"] is not None:
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, row["dim"], row["stride"]
        params.append((row, p))
    begin = time.perf_counter()
    with torch.no_grad():
        if mode == "before":  # megatron's construction draws each split weight's full master
            for row, p in params:
                if row["drawn"] and row["dim"] is not None:
                    full = row["shape"]
                    _initialize_affine_weight_cpu(p, full[0], full[1], p.shape[row["dim"]], row["dim"], row["init"],
                                                  stride=row["stride"], rank=0, world_size=tp,
                                                  skip_set_tensor_parallel_attributes=True)
    built = time.perf_counter()
    with torch.no_grad():
        for row, p in params:
            if row["drawn"]:
                seed = name_seed(SEED, row["name"])
                if mode == "before":
                    draw_full(p, row["init"], seed, 0, tp)
                else:
                    draw_parameter(p, row["init"], seed, 0, tp)
    done = time.perf_counter()
    return dict(build_s=built - begin, init_s=done - built, base_rss=base,
                param_bytes=sum(p.numel() * 4 for _, p in params))


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    if args.tp == 1:
        out = run_tp1(args.model, args.vocab, args.mode)
    else:
        out = run_simulated(args.model, args.vocab, args.mode, args.tp)
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def measure(model: str, vocab: int, tps: list[int]) -> None:
    print(f"model={model} vocab={vocab} (padded to a multiple of 128), fp32 parameters on CPU, one thread")
    print("| TP (rank 0) | path | parameters GB | base RSS GB | peak RSS GB | transient GB | build s | init s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for tp in tps:
        for mode in ("before", "after"):
            command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", model, "--vocab",
                       str(vocab), "--tp", str(tp)]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT "):])
            gb = 1e9
            transient = r["peak_rss"] - r["base_rss"] - r["param_bytes"]
            print(f"| {tp}{' (simulated)' if tp > 1 else ''} | {mode} | {r['param_bytes'] / gb:.2f} | "
                  f"{r['base_rss'] / gb:.2f} | {r['peak_rss'] / gb:.2f} | {transient / gb:.2f} | "
                  f"{r['build_s']:.1f} | {r['init_s']:.1f} |", flush=True)


def transformed(pattern, chunk: int) -> int:
    """Elements draw_normal_shard runs Box-Muller on: its rows, or whole groups of short periods."""
    if pattern.period > chunk:
        return pattern.rows * pattern.row_elements
    return (pattern.rows - 1) * pattern.period + pattern.row_elements


def arithmetic(name: str, vocab: int, tps=(1, 2, 4, 8)) -> None:
    """Per-rank host bytes of the initialisation, from the shapes alone."""
    from prosec_mcore.runtime.shard_draw import DEFAULT_CHUNK_ELEMENTS, shard_pattern

    rows = [r for r in census(name, vocab) if r["drawn"]]
    total = sum(math.prod(r["shape"]) for r in rows)
    largest = max(rows, key=lambda r: math.prod(r["shape"]))
    # bound: the float32 read buffer, the uint8 skip scratch, and (GPU) the contiguous staging copy for the upload
    chunk = 2 * (DEFAULT_CHUNK_ELEMENTS + 32) * 4 + DEFAULT_CHUNK_ELEMENTS
    gib = 2 ** 30
    print(f"model={name} vocab={vocab}: {total / 1e9:.2f} G drawn elements; largest matrix {largest['name']} "
          f"{largest['shape']} = {math.prod(largest['shape']) * 4 / gib:.2f} GiB in float32")
    print("| TP | bf16 parameters per rank GiB | before: largest host transient GiB | before: float32 drawn on the "
          "host per rank GiB | after: largest host transient MiB (bound) | Box-Muller transforms per rank G "
          "(before / after) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tp in tps:
        shard = lambda r: math.prod(r["shape"]) // (tp if r["dim"] is not None else 1)  # noqa: E731
        params = sum(shard(r) for r in rows) * 2
        # previous init, one parameter at a time: the full float32 tensor, plus the cat of this rank's
        # slice (float32) when split; on CPU megatron's construction did the same once more before it
        peak = max((math.prod(r["shape"]) + (shard(r) if tp > 1 else 0)) * 4 for r in rows)
        transforms = sum(transformed(shard_pattern(r["shape"], r["dim"], r["stride"], 0, tp), DEFAULT_CHUNK_ELEMENTS)
                         for r in rows)
        print(f"| {tp} | {params / gib:.2f} | {peak / gib:.2f} | {total * 4 / gib:.1f} (CPU: x2) | "
              f"{chunk / 2 ** 20:.0f} | {total / 1e9:.2f} / {transforms / 1e9:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tp", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--arithmetic", default=None, help="NAME:VOCAB, e.g. 8b:126464 (shapes only)")
    parser.add_argument("--child", choices=("before", "after"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        args.tp = args.tp[0]
        child(args)
    elif args.arithmetic:
        name, vocab = args.arithmetic.split(":")
        arithmetic(name, int(vocab))
    else:
        measure(args.model, args.vocab, args.tp)


if __name__ == "__main__":
    main()
