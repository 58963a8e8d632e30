"""Evaluate a trained model (likelihood) or generated samples (quality).

    # validation NELBO, perplexity bound and corrector NLL of a checkpoint (any saved layout)
    python tools/evaluate_prosec.py nelbo runs/qm9-proseco --eval-iters 20
    # samples written by tools/generate_prosec.py: unigram entropy, NFE; --molecules adds RDKit
    # validity / uniqueness / novelty (against the training split), QED, rings and FCD (against
    # the validation split), for one or more files
    python tools/evaluate_prosec.py samples runs/qm9-proseco/samples/*.jsonl --molecules data_cache/qm9
    # prompted tasks without lm-eval (the numbers lm-eval's `prosec` model gives on the same items):
    # exact match of responses to {"prompt", "answer"} lines, ELBO choice accuracy on
    # {"prompt", "choices", "gold"} lines; --model-args takes lm-eval's --model_args syntax
    python tools/evaluate_prosec.py tasks --model-args checkpoint=runs/sft,sampler=blocks,gen_length=64 \
        --generation qa.jsonl --until "\n" --choices mc.jsonl

Prints a table and writes the metrics as JSON (--out, default <first file>.metrics.json or
<checkpoint>/eval_nelbo.json).
"""

import argparse
import json
import math
import os
import sys


def evaluate_nelbo(args) -> dict:
    """The trainer's own validation (same batches, same noise, same losses) on a loaded checkpoint."""
    from prosec_mcore.cli_errors import check_checkpoint, reading_checkpoint
    from prosec_mcore.evaluation.likelihood import evaluate_checkpoint

    path = check_checkpoint(args.checkpoint)
    with reading_checkpoint(path):
        return evaluate_checkpoint(path, tp=args.tp, eval_iters=args.eval_iters, weights=args.weights,
                                   with_corrector=True if args.corrector else None)


SAMPLES_HINT = "tools/generate_prosec.py writes one JSON object with 'tokens' per line"


def read_samples(path: str) -> tuple[list, dict]:
    """The token lists of a sample file and its summary (generate_prosec.py's <file>.summary.json,
    if present). Whatever is wrong with the file is a UserInputError naming it and the line: an
    empty file is one too, since metrics of no samples would be NaN and look like a result."""
    from prosec_mcore.cli_errors import UserInputError, iter_jsonl, read_json

    samples = []
    for lineno, record in iter_jsonl(path, key="tokens", hint=SAMPLES_HINT):
        tokens = record["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise UserInputError(f"{path} line {lineno}: 'tokens' is not a list of token ids; {SAMPLES_HINT}")
        samples.append(tokens)
    if not samples:
        raise UserInputError(f"{path} holds no samples; {SAMPLES_HINT}")
    summary_path = path + ".summary.json"
    summary = read_json(summary_path, "a sample summary") if os.path.exists(summary_path) else {}
    return samples, summary


def evaluate_samples(args) -> list:
    files = {path: read_samples(path) for path in args.files}  # every file checked before slow imports
    from prosec_mcore.evaluation import unigram_entropy

    qm9 = None
    if args.molecules:
        from prosec_mcore.evaluation.qm9 import load_qm9_evaluation

        qm9 = load_qm9_evaluation(args.molecules, args.split, args.fcd_reference)

    rows = []
    for path, (samples, summary) in files.items():
        row = {"file": path, **{k: summary[k] for k in ("sampler", "steps", "corrector_steps", "corrector_every",
                                                         "corrector_mode", "nfe_per_batch", "nfe_unmask_per_batch",
                                                         "nfe_correct_per_batch", "seed") if k in summary}}
        tok = qm9.tokenizer if qm9 else None
        special = {tok.eod, tok.pad, tok.mask_id} if tok else set()
        row["unigram_entropy"] = unigram_entropy(samples, ignore_ids=special)
        if qm9:
            row.update(qm9.score(samples).to_dict())
        rows.append(row)
    return rows


def evaluate_tasks(args) -> dict:
    """Exact match and choice accuracy of prompted items (prosec_mcore/evaluation/prompted_tasks.py)."""
    from prosec_mcore.cli_errors import UserInputError
    from prosec_mcore.evaluation import prompted_tasks as pt
    from prosec_mcore.evaluation.prompted_model import ModelOptions, PromptedModel

    if not args.generation and not args.choices:
        raise UserInputError("tasks: give --generation ITEMS.jsonl and/or --choices ITEMS.jsonl")
    gen = pt.read_generation_items(args.generation) if args.generation else None  # files checked first
    mc = pt.read_choice_items(args.choices) if args.choices else None
    options = ModelOptions.parse(args.model_args)
    model = PromptedModel(options)
    result = {"model_args": args.model_args}
    if gen:
        until = [u.encode().decode("unicode_escape") for u in args.until]  # "\n" on the command line
        result["generation"] = {"file": args.generation, **pt.evaluate_generation(model, gen, until)}
    if mc:
        result["choices"] = {"file": args.choices, **pt.evaluate_choices(model, mc, args.delimiter)}
    return result


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
    p.add_argument("--eval-iters", type=int, default=None,
                   help="validation global batches (default: the run's train.eval_iters, which reproduces its log)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="the checkpoint's EMA weights when it has them (default, as training validates) or the raw ones")
    p.add_argument("--corrector", action="store_true",
                   help="also the corrector pass (NLL of x given y = argmax) for an MDLM checkpoint, whose "
                        "training validation skips it; a ProSeCo checkpoint always has it")
    p.add_argument("--out", default=None)
    s = sub.add_parser("samples", help="metrics of sample files from tools/generate_prosec.py")
    s.add_argument("files", nargs="+")
    s.add_argument("--molecules", default=None, metavar="QM9_DIR",
                   help="the prepared QM9 folder (tools/prepare_data.py --dataset qm9): SMILES metrics")
    s.add_argument("--split", default="95,5,0", help="the training run's data.split")
    s.add_argument("--fcd-reference", type=int, default=5000, help="held-out molecules for FCD")
    s.add_argument("--out", default=None)
    k = sub.add_parser("tasks", help="exact match / ELBO choice accuracy of prompted JSONL items (no lm-eval)")
    k.add_argument("--model-args", required=True,
                   help="checkpoint=DIR or hf=FOLDER, then the sampler/ELBO options, as lm-eval's --model_args")
    k.add_argument("--generation", default=None, help='JSONL of {"prompt", "answer"}: exact match of responses')
    k.add_argument("--until", nargs="*", default=[], help="stop strings that cut responses (escapes: \\n)")
    k.add_argument("--choices", default=None, help='JSONL of {"prompt", "choices", "gold"}: ELBO choice accuracy')
    k.add_argument("--delimiter", default=" ", help="between prompt and choice (lm-eval's target_delimiter)")
    k.add_argument("--out", default="prompted_tasks.json")
    args = parser.parse_args(argv)

    from prosec_mcore import quiet_known_warnings

    quiet_known_warnings()
    try:
        if args.command == "nelbo":
            result = evaluate_nelbo(args)
            print_table([result], ["iteration", "weights", "valid_nelbo", "valid_ppl_bound", "valid_corrector_nll",
                                   "valid_corrector_accuracy_on_errors", "eval_tokens"])
            out = args.out or os.path.join(os.path.dirname(result["checkpoint"]), "eval_nelbo.json")
        elif args.command == "tasks":
            from prosec_mcore.cli_errors import writable_file

            out = writable_file(args.out, "--out")
            result = evaluate_tasks(args)
            print_table([{"task": name, **{k: v for k, v in r.items() if k in ("exact_match", "acc", "acc_norm",
                                                                                "nfe_mean")}}
                         for name, r in result.items() if isinstance(r, dict)],
                        ["task", "exact_match", "acc", "acc_norm", "nfe_mean"])
        else:
            from prosec_mcore.cli_errors import writable_file

            out = writable_file(args.out or args.files[0] + ".metrics.json", "--out")
            result = evaluate_samples(args)
            print_table(result, ["file", "sampler", "steps", "corrector_steps", "corrector_every", "nfe_per_batch",
                                 "validity", "uniqueness", "novelty", "novel_per_sample", "qed_mean", "rings_mean",
                                 "fcd", "unigram_entropy"])
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"[evaluate] metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
