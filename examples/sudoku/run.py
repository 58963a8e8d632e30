"""The paper's SFT claim re-measured on 6x6 Sudoku: vanilla SFT (objective=mdlm) against ProSeCo
SFT (objective=proseco), same model, data, iterations and training seeds, each sampled with
several samplers at several step budgets, scored by an exact checker.

    OMP_NUM_THREADS=1 python examples/sudoku/run.py             # everything (cached: a rerun is cheap)
    OMP_NUM_THREADS=1 python examples/sudoku/run.py --quick     # smoke test: tiny counts, its own folders
    python examples/sudoku/run.py --report-only                 # tables and plot from results/rows.json

Stages (each skipped when its output exists):

1. **data**: puzzles.py writes ``train.jsonl`` / ``test.jsonl`` (held-out solution grids) into
   ``data_cache/sudoku``; ``tools/preprocess_data.py --sft --chat-template none`` turns the
   training puzzles into the SFT files (prompt as is, response, EOS).
2. **training**: ``tools/pretrain_prosec.py model=sudoku data=sudoku train=sudoku`` with
   ``objective=mdlm`` and ``objective=proseco`` for each ``train.seed`` in ``--seeds``, plus
   ``mdlm2x``: vanilla SFT with twice the steps, i.e. ProSeCo's training compute (a ProSeCo step
   runs two forward/backward passes) and ``mdlm_eps01``: vanilla SFT with ProSeCo's eps_train
   0.1 (so that the SC term is the only difference); two processes at a time with one thread each; a run whose
   last checkpoint is at its step count is not trained again (an interrupted one resumes).
3. **evaluation**: every checkpoint answers the same ``--num-test`` held-out puzzles with each of
   its methods (below) at each step budget (sampling seed = training seed), in a subprocess per
   run, two at a time; ``results/rows_<run>.json`` per run.
4. **report**: ``results/rows.json`` (every row), ``results.json`` (means and spreads over seeds),
   ``table.md``, ``claim.md`` (NFE to reach vanilla's best), ``paired.md`` (differences seed by
   seed at equal NFE), ``training.md`` and ``accuracy_vs_nfe.png``.

Methods. All block-sampler methods decode the whole response as ONE block (block length = the
42 generated positions): confidence-ordered unmasking over the grid, the order that suits a
puzzle; k = 42 / T tokens per step at T steps, temperature 0 (argmax proposals).

* ``vanilla + confidence``: the vanilla model, block sampler, no corrector;
* ``vanilla + ReMDM``: the vanilla model, ReMDM remasking over the response (eta 0.02);
* ``vanilla + loops (control)``: the vanilla model with the Balanced corrector, to tell the
  sampler's effect from the objective's;
* ``vanilla 2x steps + confidence``: the compute-matched vanilla model, block sampler;
* ``vanilla eps_train 0.1 + confidence``: vanilla SFT with ProSeCo's eps_train, block sampler;
* ``ProSeCo + confidence``: the ProSeCo model, block sampler, no corrector;
* ``ProSeCo Fast / Balanced / Max``: the ProSeCo model with corrector loops of up to S argmax
  iterations every ``every`` steps: Fast (every 4, S 1), Balanced (every 2, S 2), Max (every 1,
  S 4). The paper names the three regimes; these (every, S) pairs are this project's choices from
  the reference's sweep grid (every, S in {1, 2, 4, 8}).

NFE is the mean over puzzles of the network evaluations each puzzle took part in (unmasking plus
corrector; a corrector loop stops early at a fixed point).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

# run kind -> (objective, training steps as a multiple of train.iters, extra overrides). Controls:
# `mdlm2x` is vanilla SFT at ProSeCo's training compute (a ProSeCo step runs two forward/backward
# passes, MDM and SC); `mdlm_eps01` is vanilla SFT with ProSeCo's eps_train 0.1 (t in [0.1, 1]
# instead of [1e-3, 1]), so that the SC term is the only difference to ProSeCo.
RUN_KINDS = {"proseco": ("proseco", 1, []), "mdlm2x": ("mdlm", 2, []), "mdlm": ("mdlm", 1, []),
             "mdlm_eps01": ("mdlm", 1, ["objective.eps_train=0.1"])}
# method -> (run kind of the model, sampler, corrector (every, S) or None, step budgets)
METHODS = {
    "vanilla + confidence": ("mdlm", "blocks", None, "plain"),
    "vanilla + ReMDM": ("mdlm", "remdm", None, "plain"),
    "vanilla + loops (control)": ("mdlm", "blocks", (2, 2), "balanced"),
    "vanilla 2x steps + confidence": ("mdlm2x", "blocks", None, "plain"),
    "vanilla eps_train 0.1 + confidence": ("mdlm_eps01", "blocks", None, "plain"),
    "ProSeCo + confidence": ("proseco", "blocks", None, "plain"),
    "ProSeCo Fast (every 4, S 1)": ("proseco", "blocks", (4, 1), "plain"),
    "ProSeCo Balanced (every 2, S 2)": ("proseco", "blocks", (2, 2), "balanced"),
    "ProSeCo Max (every 1, S 4)": ("proseco", "blocks", (1, 4), "max"),
}
FULL = dict(num_train=26000, num_test=200, blanks=10, seeds=[1, 2, 3], iters=None,
            steps={"plain": [4, 8, 16, 42], "balanced": [4, 8, 16], "max": [4, 8]})
QUICK = dict(num_train=300, num_test=8, blanks=20, seeds=[1], iters=4,
             steps={"plain": [4], "balanced": [4], "max": [4]})
GEN_LENGTH = 42  # 41 response characters + EOS


def log(msg):
    print(f"[sudoku] {msg}", flush=True)


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


# ----------------------------------------------------------------------------------- 1. data
def prepare_data(args, cfg):
    import puzzles

    prefix = os.path.join(args.data_dir, "sudoku_sft")
    stamp = {"num_train": cfg["num_train"], "num_test": cfg["num_test"], "blanks": cfg["blanks"]}
    stamp_path = os.path.join(args.data_dir, "params.json")
    if os.path.exists(prefix + "_sft.json") and os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp:
        log(f"data: {args.data_dir} is ready")
        return prefix
    os.makedirs(args.data_dir, exist_ok=True)
    t = time.time()
    train, test = puzzles.make_split(cfg["num_train"], cfg["num_test"], cfg["blanks"])
    for name, records in (("train", train), ("test", test)):
        digest = puzzles.write_jsonl(records, os.path.join(args.data_dir, f"{name}.jsonl"))
        log(f"data: {len(records)} {name} puzzles, {cfg['blanks']} blanks each, sha256 {digest[:16]}")
    with open(os.path.join(args.data_dir, "chars.txt"), "w") as f:
        f.write(puzzles.VOCAB)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--sft", "--no-progress",
                    "--input", os.path.join(args.data_dir, "train.jsonl"), "--tokenizer-kind", "char",
                    "--tokenizer-path", os.path.join(args.data_dir, "chars.txt"), "--chat-template", "none",
                    "--seq-length", str(puzzles.PROMPT_CHARS + GEN_LENGTH), "--output-prefix", prefix],
                   check=True, env=env())
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    log(f"data: written in {time.time() - t:.0f} s")
    return prefix


# ------------------------------------------------------------------------------- 2. training
def run_dir(args, kind, seed):
    return os.path.join(args.runs, f"{kind}-seed{seed}")


def final_iteration(path):
    """The iteration of a run's latest complete checkpoint, or None."""
    latest = os.path.join(path, "checkpoints", "latest")
    if not os.path.exists(latest):
        return None
    target = os.path.realpath(latest) if os.path.islink(latest) else os.path.join(path, "checkpoints",
                                                                                 open(latest).read().strip())
    name = os.path.basename(target.rstrip("/"))
    return int(name.split("_")[-1]) if name.startswith("iter_") else None


def train_command(args, cfg, prefix, kind, seed, iters):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain_prosec.py"), "model=sudoku", "data=sudoku",
           "train=sudoku", f"objective={RUN_KINDS[kind][0]}", f"train.seed={seed}", f"data.data_prefix={prefix}",
           f"data.tokenizer.path={os.path.join(args.data_dir, 'chars.txt')}", f"run_dir={run_dir(args, kind, seed)}"]
    if cfg["iters"]:
        cmd += ["train.eval_interval=0", "train.log_interval=1", "train.lr_warmup_iters=1"]
    return cmd + RUN_KINDS[kind][2] + args.train_overrides + [f"train.iters={iters * RUN_KINDS[kind][1]}"]


def train_iters(args, cfg):
    if cfg["iters"]:
        return cfg["iters"]
    for o in args.train_overrides:
        if o.startswith("train.iters="):
            return int(o.split("=", 1)[1])
    import yaml

    return yaml.safe_load(open(os.path.join(ROOT, "configs", "train", "sudoku.yaml")))["iters"]


def run_pool(jobs, parallel):
    """Run (name, command, log path) jobs, ``parallel`` at a time; stop at the first failure."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log_path = pending.pop(0)
            log(f"start {name} (log {log_path})")
            running.append((name, subprocess.Popen(cmd, stdout=open(log_path, "a"), stderr=subprocess.STDOUT,
                                                   env=env(), cwd=ROOT), time.time(), log_path))
        time.sleep(2)
        for job in list(running):
            name, proc, start, log_path = job
            if proc.poll() is None:
                continue
            running.remove(job)
            if proc.returncode != 0:
                for _, other, _, _ in running:
                    other.terminate()
                lines = open(log_path).read().splitlines()
                errors = [line for line in lines if line.startswith("error:")]  # the tools' one-line user errors
                why = errors[-1] if errors else "\n  ".join(lines[-5:])
                raise SystemExit(f"[sudoku] {name} failed (exit {proc.returncode}; log {log_path}): {why}")
            log(f"done  {name} in {(time.time() - start) / 60:.1f} min")


def train_all(args, cfg, prefix):
    iters = train_iters(args, cfg)
    jobs = []
    for kind in RUN_KINDS:  # the slower runs first: the pool ends sooner
        for seed in cfg["seeds"]:
            path = run_dir(args, kind, seed)
            if final_iteration(path) == iters * RUN_KINDS[kind][1]:
                log(f"train: {path} is done ({iters * RUN_KINDS[kind][1]} iterations)")
                continue
            os.makedirs(path, exist_ok=True)
            jobs.append((f"train {kind} seed {seed}", train_command(args, cfg, prefix, kind, seed, iters),
                         os.path.join(path, "train.log")))
    run_pool(jobs, args.parallel)


# ----------------------------------------------------------------------------- 3. evaluation
def method_specs(cfg, kind):
    """[(method, steps, SamplerSpec)] for a model of run kind ``kind``."""
    from prosec_mcore.sampling import CorrectorSettings, SamplerSpec

    out = []
    for name, (obj, sampler, corrector, budget) in METHODS.items():
        if obj != kind:
            continue
        for steps in cfg["steps"][budget]:
            if sampler == "remdm":
                spec = SamplerSpec("remdm", steps=steps, eta=0.02)
            else:
                every, s = corrector or (1, 0)
                spec = SamplerSpec("blocks", steps=steps, block_length=GEN_LENGTH,
                                   corrector=CorrectorSettings(steps=s, every=every))
            out.append((name, steps, spec))
    return out


def evaluate_run(args, cfg, objective, seed):
    """Every method of this run's model on the test puzzles; rows appended to its rows file."""
    import checker
    from prosec_mcore import quiet_known_warnings
    from prosec_mcore.sampling.loading import load_from_checkpoint
    from prosec_mcore.sampling.prompted import generate_responses

    quiet_known_warnings()
    path = run_dir(args, objective, seed)
    rows_path = os.path.join(args.out, f"rows_{objective}-seed{seed}.json")
    rows = json.load(open(rows_path)) if os.path.exists(rows_path) else []
    done = {(r["method"], r["steps"]) for r in rows}
    test = [json.loads(line) for line in open(os.path.join(args.data_dir, "test.jsonl"))]
    loaded = load_from_checkpoint(path)
    tok = loaded.tokenizer
    prompts = [tok.encode(p["prompt"]) for p in test]
    for method, steps, spec in method_specs(cfg, objective):
        if (method, steps) in done:
            continue
        t = time.time()
        out = generate_responses(spec, loaded.denoiser, loaded.schedule, prompts, GEN_LENGTH, tok.eod, seed,
                                 batch_size=args.batch_size)
        verdicts = [checker.judge(tok.decode(o["ids"]), p["prompt"], p["response"]) for o, p in zip(out, test)]
        row = {"objective": objective, "train_seed": seed, "method": method, "steps": steps,
               "iteration": loaded.iteration, "num_puzzles": len(test), "sampler": spec.describe(),
               "nfe": statistics.mean(o["nfe"] for o in out),
               "nfe_correct": statistics.mean(o["nfe_correct"] for o in out),
               "puzzle_accuracy": statistics.mean(v.solved for v in verdicts),
               "cell_accuracy": statistics.mean(v.cell_accuracy for v in verdicts),
               "malformed": sum(v.reason.startswith("malformed") for v in verdicts),
               "seconds": time.time() - t}
        rows.append(row)
        with open(rows_path, "w") as f:
            json.dump(rows, f, indent=1)
        log(f"{objective} seed {seed} | {method} T={steps}: NFE {row['nfe']:.1f} | puzzles "
            f"{row['puzzle_accuracy']:.3f} | cells {row['cell_accuracy']:.3f} | malformed {row['malformed']} "
            f"| {row['seconds']:.0f} s")


def evaluate_all(args, cfg):
    os.makedirs(args.out, exist_ok=True)
    jobs = []
    for objective in RUN_KINDS:
        wanted = {(m, t) for m, (obj, _, _, budget) in METHODS.items() if obj == objective
                  for t in cfg["steps"][budget]}
        for seed in cfg["seeds"]:
            name = f"{objective}-seed{seed}"
            rows_path = os.path.join(args.out, f"rows_{name}.json")
            if os.path.exists(rows_path) and wanted <= {(r["method"], r["steps"]) for r in json.load(open(rows_path))}:
                log(f"evaluate: {rows_path} is complete")
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--evaluate-run", name] + args.passthrough
            jobs.append((f"evaluate {name}", cmd, os.path.join(run_dir(args, objective, seed), "eval.log")))
    run_pool(jobs, args.parallel)


# --------------------------------------------------------------------------------- 4. report
def aggregate(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["steps"]), []).append(r)
    out = []
    for (method, steps), rs in groups.items():
        a = {"method": method, "objective": rs[0]["objective"], "steps": steps, "seeds": len(rs),
             "per_seed": {r["train_seed"]: r["puzzle_accuracy"] for r in rs}}
        for k in ("nfe", "puzzle_accuracy", "cell_accuracy", "malformed"):
            v = [float(r[k]) for r in rs]
            a[k] = statistics.mean(v)
            a[k + "_sd"] = statistics.stdev(v) if len(v) > 1 else 0.0
            a[k + "_min"], a[k + "_max"] = min(v), max(v)
        out.append(a)
    order = list(METHODS)
    return sorted(out, key=lambda a: (order.index(a["method"]) if a["method"] in order else 99, a["steps"]))


def pct(a, k):
    return f"{100 * a[k]:.1f} ± {100 * a[k + '_sd']:.1f} ({100 * a[k + '_min']:.0f}-{100 * a[k + '_max']:.0f})"


def write_table(agg, out):
    lines = ["| method | T | NFE | puzzle accuracy % (min-max) | cell accuracy % (min-max) | malformed | seeds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for a in agg:
        lines.append(f"| {a['method']} | {a['steps']} | {a['nfe']:.1f} | {pct(a, 'puzzle_accuracy')} | "
                     f"{pct(a, 'cell_accuracy')} | {a['malformed']:.1f} | {a['seeds']} |")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_claim(agg, out):
    """The best puzzle accuracy of a vanilla reference (any of its samplers, any T) and, per other
    method, the lowest NFE at which its mean reaches it (the paper: 2-3x fewer NFE than vanilla),
    and whether it beats the reference's best at equal or lower NFE. Two references: vanilla SFT
    at the same training steps (the paper's protocol) and at ProSeCo's training compute (2x steps)."""
    lines = []
    for kind, title in (("mdlm", "vanilla SFT, same training steps"),
                        ("mdlm2x", "vanilla SFT, 2x steps (ProSeCo's training compute)"),
                        ("mdlm_eps01", "vanilla SFT with eps_train 0.1 (ProSeCo's)")):
        vanilla = [a for a in agg if a["objective"] == kind and "control" not in a["method"]]
        if not vanilla:
            continue
        best = max(vanilla, key=lambda a: (a["puzzle_accuracy"], -a["nfe"]))
        lines += [f"### Reference: {title}", "",
                  f"Its best puzzle accuracy: {pct(best, 'puzzle_accuracy')} with {best['method']} "
                  f"at T={best['steps']} "
                  f"({best['nfe']:.1f} NFE).", "",
                  "| method | lowest NFE reaching it | NFE ratio | method's best accuracy % (NFE) | "
                  "beats the reference's best at equal or lower NFE |", "|---|---:|---:|---:|---|"]
        for method in METHODS:
            pts = sorted([a for a in agg if a["method"] == method], key=lambda a: a["nfe"])
            if not pts or pts[0]["objective"] == kind and "control" not in method:
                continue
            reach = next((a for a in pts if a["puzzle_accuracy"] >= best["puzzle_accuracy"]), None)
            top = max(pts, key=lambda a: a["puzzle_accuracy"])
            wins = []
            for a in pts:
                rivals = [v for v in vanilla if v["nfe"] <= a["nfe"] + 1e-9]
                if rivals:
                    r = max(rivals, key=lambda v: v["puzzle_accuracy"])
                    wins.append(f"{'yes' if a['puzzle_accuracy'] > r['puzzle_accuracy'] else 'no'} @{a['nfe']:.0f}")
            lines.append(f"| {method} | " + (f"{reach['nfe']:.1f}" if reach else "never") + " | "
                         + (f"{best['nfe'] / reach['nfe']:.2f}x" if reach else "-") + " | "
                         f"{100 * top['puzzle_accuracy']:.1f} ({top['nfe']:.0f}) | {', '.join(wins) or '-'} |")
        lines.append("")
    with open(os.path.join(out, "claim.md"), "w") as f:
        f.write("\n".join(lines))


PAIRS = [  # (method, the reference it is compared with on the same training seed)
    ("ProSeCo Fast (every 4, S 1)", "ProSeCo + confidence"),
    ("ProSeCo Balanced (every 2, S 2)", "ProSeCo + confidence"),
    ("ProSeCo Max (every 1, S 4)", "ProSeCo + confidence"),
    ("ProSeCo + confidence", "vanilla + confidence"),
    ("ProSeCo + confidence", "vanilla 2x steps + confidence"),
    ("ProSeCo + confidence", "vanilla eps_train 0.1 + confidence"),
]


def write_paired(rows, out):
    """Paired differences, training seed by seed: a method's puzzle accuracy minus its
    reference's at the same NFE, the reference's accuracy interpolated linearly in log2(NFE)
    between its measured budgets (not extrapolated). The seeds' spread in model quality is shared
    by both sides of a pair, so these differences are far less noisy than the methods' bands."""
    import math

    def curve(method, seed):
        pts = sorted((r["nfe"], r["puzzle_accuracy"]) for r in rows
                     if r["method"] == method and r["train_seed"] == seed)
        return [(math.log2(n), a) for n, a in pts]

    def interp(pts, x):
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 - 1e-9 <= x <= x1 + 1e-9:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
        return None

    lines = ["| method | T | NFE | reference (same seed, same NFE) | accuracy difference, points (mean ± sd) | "
             "per seed | seeds better |", "|---|---:|---:|---|---:|---|---:|"]
    seeds = sorted({r["train_seed"] for r in rows})
    for method, reference in PAIRS:
        for steps in sorted({r["steps"] for r in rows if r["method"] == method}):
            diffs, nfes = [], []
            for seed in seeds:
                mine = [r for r in rows if r["method"] == method and r["train_seed"] == seed and r["steps"] == steps]
                ref = curve(reference, seed)
                if not mine or len(ref) < 1:
                    continue
                y = interp(ref, math.log2(mine[0]["nfe"])) if len(ref) > 1 else None
                if y is None:
                    continue
                diffs.append(100 * (mine[0]["puzzle_accuracy"] - y))
                nfes.append(mine[0]["nfe"])
            if not diffs:
                continue
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            lines.append(f"| {method} | {steps} | {statistics.mean(nfes):.1f} | {reference} | "
                         f"{statistics.mean(diffs):+.1f} ± {sd:.1f} | {', '.join(f'{d:+.1f}' for d in diffs)} | "
                         f"{sum(d > 0 for d in diffs)}/{len(diffs)} |")
    with open(os.path.join(out, "paired.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(agg, out, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, (k, label) in zip(axes, [("puzzle_accuracy", "puzzle accuracy (any valid completion)"),
                                     ("cell_accuracy", "cell accuracy (blank cells vs the generator's solution)")]):
        for i, method in enumerate(METHODS):
            pts = sorted([a for a in agg if a["method"] == method], key=lambda a: a["nfe"])
            if not pts:
                continue
            x = [a["nfe"] for a in pts]
            style = "--" if pts[0]["objective"].startswith("mdlm") else "-"
            line, = ax.plot(x, [a[k] for a in pts], style, marker="o", label=method, color=f"C{i}")
            ax.fill_between(x, [a[k + "_min"] for a in pts], [a[k + "_max"] for a in pts], alpha=0.15,
                            color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per puzzle (network evaluations)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_nfe.png"), dpi=110)


def training_table(args, cfg, out):
    """Per run: iterations, the last 20 iterations' mean MDM loss, denoiser accuracy on masked
    response tokens and (ProSeCo) SC loss, and the summed step time."""
    lines = ["| run | seed | iterations | MDM loss | denoiser accuracy (masked) | SC loss | training time (min) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for objective in ("mdlm", "mdlm2x", "mdlm_eps01", "proseco"):
        for seed in cfg["seeds"]:
            path = os.path.join(run_dir(args, objective, seed), "metrics.jsonl")
            if not os.path.exists(path):
                continue
            rows = [json.loads(line) for line in open(path) if line.strip()]
            tail = rows[-20:]
            sc = f"{statistics.mean(r['sc_loss'] for r in tail):.3f}" if objective == "proseco" else "-"
            lines.append(f"| {objective} | {seed} | {rows[-1]['iteration']} | "
                         f"{statistics.mean(r['mdm_loss'] for r in tail):.3f} | "
                         f"{statistics.mean(r['denoiser_accuracy'] for r in tail):.3f} | {sc} | "
                         f"{sum(r.get('step_time_s', 0) for r in rows) / 60:.1f} |")
    with open(os.path.join(out, "training.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def report(args, cfg):
    rows = []
    for objective in RUN_KINDS:
        for seed in cfg["seeds"]:
            p = os.path.join(args.out, f"rows_{objective}-seed{seed}.json")
            if os.path.exists(p):
                rows += json.load(open(p))
    if not rows:
        raise SystemExit(f"[sudoku] no evaluation rows in {args.out}: run without --report-only first")
    agg = aggregate(rows)
    with open(os.path.join(args.out, "rows.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": {k: v for k, v in cfg.items()}, "methods": {k: list(v) for k, v in METHODS.items()},
                   "aggregate": agg}, f, indent=1)
    write_table(agg, args.out)
    write_claim(agg, args.out)
    write_paired(rows, args.out)
    training_table(args, cfg, args.out)
    seeds = sorted({r["train_seed"] for r in rows})
    plot(agg, args.out, f"6x6 Sudoku, {cfg['blanks']} blanks, {rows[0]['num_puzzles']} held-out puzzles: "
                        f"mean over training seeds {seeds}, band = min-max")
    for name in ("training.md", "table.md", "claim.md", "paired.md"):
        print(f"\n{name}\n" + open(os.path.join(args.out, name)).read())
    log(f"results in {args.out}: rows.json results.json table.md claim.md paired.md training.md accuracy_vs_nfe.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny counts, everything under runs/sudoku-quick")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 1 2 3)")
    p.add_argument("--num-test", type=int, default=None, help="held-out puzzles (default 200)")
    p.add_argument("--parallel", type=int, default=2, help="processes at a time (one thread each)")
    p.add_argument("--batch-size", type=int, default=200, help="puzzles per sampling batch")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--runs", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--evaluate-run", default=None, help=argparse.SUPPRESS)  # internal: one run's evaluation
    p.add_argument("train_overrides", nargs="*", help="extra Hydra overrides for training (e.g. train.iters=300)")
    args = p.parse_args()

    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.num_test:
        cfg["num_test"] = args.num_test
    suffix = "-quick" if args.quick else ""
    args.data_dir = args.data_dir or os.path.join("data_cache", "sudoku" + suffix)
    args.runs = args.runs or os.path.join("runs", "sudoku" + suffix)
    if not args.out:
        args.out = os.path.join(args.runs, "results") if args.quick else os.path.join("examples", "sudoku", "results")
    args.passthrough = [a for a in sys.argv[1:] if a not in ("--report-only",)]
    os.chdir(ROOT)

    if args.evaluate_run:
        objective, seed = args.evaluate_run.split("-seed")
        evaluate_run(args, cfg, objective, int(seed))
        return 0
    if not args.report_only:
        prefix = prepare_data(args, cfg)
        t = time.time()
        train_all(args, cfg, prefix)
        log(f"training stage: {(time.time() - t) / 60:.1f} min")
        t = time.time()
        evaluate_all(args, cfg)
        log(f"evaluation stage: {(time.time() - t) / 60:.1f} min")
    report(args, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
