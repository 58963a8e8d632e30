"""Evaluate a trained model (likelihood) or generated samples (quality).

    # validation NELBO, perplexity bound and corrector NLL of a checkpoint (any saved layout)
    python tools/evaluate_prosec.py nelbo runs/qm9-proseco --eval-iters 20
    # samples written by tools/generate_prosec.py: unigram entropy, NFE; --molecules adds RDKit
    # validity / uniqueness / novelty (against the training split), QED, rings and FCD (against
    # the validation split), for one or more files
    python tools/evaluate_prosec.py samples runs/qm9-proseco/samples/*.jsonl --molecules data_cache/qm9

Prints a table and writes the metrics as JSON (--out, default <first file>.metrics.json or
<checkpoint>/eval_nelbo.json).
"""

import argparse
import json
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def evaluate_nelbo(args) -> dict:
    """The trainer's own validation pass (same noise, same losses) on a loaded checkpoint."""
    from megatron.core import dist_checkpointing

    from prosec_mcore.config_loader import config_from_dict
    from prosec_mcore.training.checkpoint import resolve_checkpoint
    from prosec_mcore.training.trainer import Trainer

    path = resolve_checkpoint(args.checkpoint)
    cfg = config_from_dict(dist_checkpointing.load_common_state_dict(path)["config"])
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp, cfg.parallel.sequence_parallel = args.tp, 1, None, False
    cfg.checkpoint.load, cfg.checkpoint.save_interval, cfg.checkpoint.save_on_exit_signal = path, 0, False
    cfg.train.eval_iters = args.eval_iters
    cfg.logging.tensorboard, cfg.logging.wandb = False, False
    cfg.run_dir = tempfile.mkdtemp(prefix="prosec_eval_")
    trainer = Trainer(cfg)
    metrics = trainer.validate()
    metrics.update(checkpoint=path, iteration=trainer.start_iteration, eval_iters=args.eval_iters,
                   eval_tokens=args.eval_iters * cfg.train.global_batch_size * cfg.data.seq_length)
    return metrics


def evaluate_samples(args) -> list:
    from prosec_mcore.evaluation import unigram_entropy

    qm9 = None
    if args.molecules:
        from prosec_mcore.evaluation.qm9 import load_qm9_evaluation

        qm9 = load_qm9_evaluation(args.molecules, args.split, args.fcd_reference)

    rows = []
    for path in args.files:
        with open(path) as f:
            samples = [json.loads(line) for line in f]
        summary_path = path + ".summary.json"
        summary = {}
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        row = {"file": path, **{k: summary[k] for k in ("sampler", "steps", "corrector_steps", "corrector_every",
                                                         "corrector_mode", "nfe_per_batch", "nfe_unmask_per_batch",
                                                         "nfe_correct_per_batch", "seed") if k in summary}}
        tok = qm9.tokenizer if qm9 else None
        special = {tok.eod, tok.pad, tok.mask_id} if tok else set()
        row["unigram_entropy"] = unigram_entropy([s["tokens"] for s in samples], ignore_ids=special)
        if qm9:
            row.update(qm9.score([s["tokens"] for s in samples]).to_dict())
        rows.append(row)
    return rows


def print_table(rows: list, keys: list) -> None:
    keys = [k for k in keys if any(k in r for r in rows)]
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return os.path.basename(v) if isinstance(v, str) and v.endswith(".jsonl") else str(v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("nelbo", help="validation NELBO / perplexity bound / corrector NLL of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--eval-iters", type=int, default=20, help="validation global batches")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", default=None)
    s = sub.add_parser("samples", help="metrics of sample files from tools/generate_prosec.py")
    s.add_argument("files", nargs="+")
    s.add_argument("--molecules", default=None, metavar="QM9_DIR",
                   help="the prepared QM9 folder (tools/prepare_data.py --dataset qm9): SMILES metrics")
    s.add_argument("--split", default="95,5,0", help="the training run's data.split")
    s.add_argument("--fcd-reference", type=int, default=5000, help="held-out molecules for FCD")
    s.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from prosec_mcore import quiet_known_warnings

    quiet_known_warnings()
    try:
        if args.command == "nelbo":
            result = evaluate_nelbo(args)
            print_table([result], ["iteration", "valid_nelbo", "valid_ppl_bound", "valid_corrector_nll",
                                   "valid_corrector_accuracy_on_errors", "eval_tokens"])
            out = args.out or os.path.join(os.path.dirname(result["checkpoint"]), "eval_nelbo.json")
        else:
            missing = [f for f in args.files if not os.path.isfile(f)]
            if missing:
                raise FileNotFoundError(f"sample file(s) not found: {', '.join(missing)}")
            result = evaluate_samples(args)
            print_table(result, ["file", "sampler", "steps", "corrector_steps", "corrector_every", "nfe_per_batch",
                                 "validity", "uniqueness", "novelty", "novel_per_sample", "qed_mean", "rings_mean",
                                 "fcd", "unigram_entropy"])
            out = args.out or args.files[0] + ".metrics.json"
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"[evaluate] metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
