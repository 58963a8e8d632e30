"""Plot the loss terms of one or more runs from their metrics.jsonl.

    python tools/plot_metrics.py runs/quickstart [runs/other ...] --out runs/quickstart/losses.png

Panels: the MDM loss, the self-correction loss (each with a moving average over --window
iterations) and the validation NELBO / corrector NLL where validation ran.
"""
import argparse
import os
import sys

from prosec_mcore.cli_errors import UserInputError, exits_on_user_error, iter_jsonl, writable_file

METRICS_HINT = "tools/pretrain_prosec.py writes one JSON object per logged iteration"


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UserInputError(f"{path} not found: is {run_dir} the run_dir of a training run?")
    rows = [row for _, row in iter_jsonl(path, key="iteration", hint=METRICS_HINT)]
    if not rows:
        raise UserInputError(f"{path} holds no iterations yet; {METRICS_HINT}")
    return rows


def moving_average(values, window):
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


@exits_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run_dir>/losses.png)")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("error: plotting needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    runs = {d: read_metrics(d) for d in args.run_dirs}
    out = writable_file(args.out or os.path.join(args.run_dirs[0], "losses.png"), "--out")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run_dir, rows in runs.items():
        label = os.path.basename(os.path.normpath(run_dir))
        its = [r["iteration"] for r in rows]
        for ax, key in zip(axes[:2], ("mdm_loss", "sc_loss")):
            values = [r[key] for r in rows]
            if not any(values):  # objective=mdlm has no self-correction term
                continue
            line, = ax.plot(its, values, alpha=0.25)
            ax.plot(its, moving_average(values, args.window), color=line.get_color(), label=label)
        valid = [r for r in rows if "valid_nelbo" in r]
        if valid:
            axes[2].plot([r["iteration"] for r in valid], [r["valid_nelbo"] for r in valid], "o-", label=f"{label} NELBO")
            corrector = [r for r in valid if "valid_corrector_nll" in r]  # MDLM runs validate without it
            if corrector:
                axes[2].plot([r["iteration"] for r in corrector], [r["valid_corrector_nll"] for r in corrector], "s--",
                             label=f"{label} corrector NLL")
    for ax, title in zip(axes, ("MDM loss (train)", "self-correction loss (train)", "validation (per token)")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"[prosec] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
