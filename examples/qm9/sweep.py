"""Sample the MDLM-trained and the ProSeCo-trained QM9 models at several step counts and
corrector settings, score every sample set, and write a table and a plot of quality against NFE.

    python examples/qm9/sweep.py --mdlm runs/qm9-mdlm --proseco runs/qm9-proseco \\
        --num-samples 500 --seeds 1 2 3 --out examples/qm9/results

Writes <out>/results_<model>.json (one row per sampler setting x seed), then <out>/table.md (means
and standard deviations over seeds) and <out>/quality_vs_nfe.png from every results_*.json there.
--only samples one of the two models (e.g. while the other is still training); the table and plot
then cover whatever results the folder holds.
"""

import argparse
import json
import os
import statistics
import sys
import time


METRICS = ("validity", "num_valid", "num_unique", "num_novel", "qed_mean", "fcd")


def settings(steps_list, proseco_settings):
    """(label, SamplerSpec) pairs: MDLM sampling at every T, ProSeCo at every (T, omega, S)."""
    from prosec_mcore.sampling import CorrectorSettings, SamplerSpec

    for steps in steps_list:
        yield f"mdlm T={steps}", SamplerSpec("mdlm", steps)
    for steps in steps_list:
        for every, s in proseco_settings:
            if every <= steps:
                yield (f"proseco T={steps} w={every} S={s}",
                       SamplerSpec("proseco", steps, CorrectorSettings(steps=s, every=every)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mdlm", help="run dir or checkpoint of the objective=mdlm model")
    p.add_argument("--proseco", help="run dir or checkpoint of the objective=proseco model")
    p.add_argument("--only", choices=("mdlm-trained", "proseco-trained"), default=None)
    p.add_argument("--data", default="data_cache/qm9")
    p.add_argument("--split", default="95,5,0")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--corrector", nargs="+", default=["1:1", "2:2", "4:2"], help="omega:S pairs")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="examples/qm9/results")
    args = p.parse_args()

    from prosec_mcore import quiet_known_warnings
    from prosec_mcore.evaluation.qm9 import load_qm9_evaluation
    from prosec_mcore.sampling import generate
    from prosec_mcore.sampling.loading import load_from_checkpoint

    quiet_known_warnings()
    qm9 = load_qm9_evaluation(args.data, args.split)
    proseco_settings = [tuple(map(int, pair.split(":"))) for pair in args.corrector]

    os.makedirs(args.out, exist_ok=True)
    for model_name, path in (("mdlm-trained", args.mdlm), ("proseco-trained", args.proseco)):
        if (args.only and model_name != args.only) or path is None:
            continue
        rows = []
        loaded = load_from_checkpoint(path)
        print(f"[sweep] {model_name}: {loaded.source} (iteration {loaded.iteration})", flush=True)
        for label, spec in settings(args.steps, proseco_settings if model_name == "proseco-trained" else []):
            for seed in args.seeds:
                start = time.time()
                out = generate(spec, loaded.denoiser, loaded.schedule, args.num_samples, args.batch_size,
                               loaded.seq_length, seed)
                metrics = qm9.score(out["tokens"].tolist()).to_dict()
                row = {"model": model_name, "iteration": loaded.iteration, "setting": label, "seed": seed,
                       **spec.describe(), "nfe": out["stats"]["nfe_per_batch"],
                       "nfe_unmask": out["stats"]["nfe_unmask_per_batch"],
                       "nfe_correct": out["stats"]["nfe_correct_per_batch"], **metrics,
                       "seconds": round(time.time() - start, 1)}
                rows.append(row)
                print(f"[sweep] {model_name} {label} seed {seed}: NFE {row['nfe']:.1f} valid {metrics['num_valid']} "
                      f"unique {metrics['num_unique']} novel {metrics['num_novel']} QED {metrics['qed_mean']:.3f} "
                      f"FCD {metrics['fcd']:.2f} ({row['seconds']} s)", flush=True)
                with open(os.path.join(args.out, f"results_{model_name}.json"), "w") as f:
                    json.dump(rows, f, indent=1)
    rows = []
    for name in ("mdlm-trained", "proseco-trained"):
        path = os.path.join(args.out, f"results_{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                rows += json.load(f)
    write_table(rows, os.path.join(args.out, "table.md"))
    plot(rows, os.path.join(args.out, "quality_vs_nfe.png"))
    print(f"[sweep] results: {args.out}/results_*.json, table.md, quality_vs_nfe.png")
    return 0


def aggregate(rows):
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["setting"]), []).append(r)
    out = []
    for (model, setting), rs in groups.items():
        agg = {"model": model, "setting": setting, "seeds": len(rs), "nfe": statistics.mean(r["nfe"] for r in rs)}
        for m in METRICS:  # QED and FCD are NaN for a seed without (enough) valid molecules
            values = [float(r[m]) for r in rs if r[m] == r[m]]
            agg[m] = statistics.mean(values) if values else float("nan")
            agg[m + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(agg)
    return out


def write_table(rows, path):
    lines = ["| model | sampler | NFE | valid | unique | novel | validity | QED | FCD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in aggregate(rows):
        pm = lambda m, f="{:.1f}": f"{f.format(a[m])} ± {f.format(a[m + '_sd'])}"  # noqa: E731
        lines.append(f"| {a['model']} | {a['setting']} | {a['nfe']:.1f} | {pm('num_valid')} | {pm('num_unique')} | "
                     f"{pm('num_novel')} | {pm('validity', '{:.3f}')} | {pm('qed_mean', '{:.3f}')} | "
                     f"{pm('fcd', '{:.2f}')} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = {}
    for a in agg:
        sampler = a["setting"].split(" T=")[0]
        tail = a["setting"].split(" ", 2)[2] if sampler == "proseco" else ""
        series.setdefault(f"{a['model']}, {sampler} {tail}".strip(), []).append(a)
    for ax, (metric, title) in zip(axes, [("num_valid", "valid molecules"), ("num_novel", "novel valid molecules"),
                                          ("fcd", "FCD to held-out QM9 (lower is better)")]):
        for name, pts in series.items():
            pts = sorted(pts, key=lambda a: a["nfe"])
            ax.errorbar([a["nfe"] for a in pts], [a[metric] for a in pts], yerr=[a[metric + "_sd"] for a in pts],
                        marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per sample batch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
