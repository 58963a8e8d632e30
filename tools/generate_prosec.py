"""Sample from a trained ProSeCo / MDLM model.

    # ProSeCo: 16 unmasking steps, a 2-step argmax corrector loop after every 4th step
    python tools/generate_prosec.py runs/qm9-proseco --sampler proseco --steps 16 \\
        --corrector-steps 2 --corrector-every 4 --num-samples 512 --out samples.jsonl
    # MDLM ancestral sampling; ReMDM; semi-autoregressive blocks; a Hugging Face export
    python tools/generate_prosec.py runs/qm9-mdlm --sampler mdlm --steps 32
    python tools/generate_prosec.py runs/qm9-mdlm --sampler remdm --steps 32 --eta 0.05
    python tools/generate_prosec.py runs/a --sampler semi_ar --block-length 16 --threshold 0.9
    python tools/generate_prosec.py hf_out/ --hf --sampler proseco --steps 32 --corrector-steps 1
    # an SFT model answering prompts (JSONL: {"prompt": ...} or {"messages": [...]}): the paper's
    # block sampler, 4 blocks of 32, 2 tokens per step, a 1-step corrector loop every 2nd step
    python tools/generate_prosec.py runs/sft --prompts questions.jsonl --gen-length 128 --sampler blocks \
        --steps 64 --block-length 32 --corrector-steps 1 --corrector-every 2 --batch-size 8
    # the reference's OpenWebText evaluation: nucleus sampling with p = 0.9, T = L
    python tools/generate_prosec.py runs/owt --steps 1024 --corrector-steps 1 --top-p 0.9
    # tensor parallel (checkpoints reshard on load; sampling needs PP=1), data parallel over the rest
    torchrun --nproc-per-node 4 tools/generate_prosec.py runs/a --tp 2 --num-samples 256

--prompt fixes a prefix (text); --template fixes any positions: a string as long as the sequence
in which --blank (default "_") marks the positions to generate (infilling). --prompts answers a
file of prompts (rendered with --chat-template as the SFT data was; docs/sft.md): each row is its
prompt, --gen-length positions to generate and EOS filler, and the response is read up to its EOS.

The defaults follow the paper authors' sampler (docs/sampling.md): the EMA weights, output reuse
after a step that unmasked nothing (--cache-rule reference), the corrector fed sigma(tau_j)
(--corrector-time tau) and, under guidance, run on the conditional model (--corrector-guidance
conditional); the alternatives are options.

Writes --out (JSON lines: one {"index", "text", "tokens"} per sample; with --prompts one
{"index", "prompt", "response", "nfe", ...} per prompt) and <out>.summary.json (sampler settings,
NFE totals and per batch, timings), and prints where they are.
"""

import argparse
import json
import os
import sys
import time

from prosec_mcore.cli_errors import (
    UserInputError,
    check_checkpoint,
    check_hf_folder,
    exits_on_user_error,
    reading_checkpoint,
    user_input_errors,
    writable_file,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint dir, run dir (its latest checkpoint), or HF folder with --hf")
    p.add_argument("--hf", action="store_true", help="MODEL is a Hugging Face folder (plain PyTorch)")
    p.add_argument("--sampler", default="proseco", choices=("mdlm", "proseco", "remdm", "semi_ar", "blocks"))
    p.add_argument("--steps", type=int, default=32, help="T unmasking steps (blocks: over all blocks)")
    p.add_argument("--corrector-steps", type=int, default=1, help="S evaluations per corrector loop")
    p.add_argument("--corrector-every", type=int, default=1, help="omega: a loop every omega steps")
    p.add_argument("--corrector-mode", default="argmax", choices=("argmax", "sample", "top_k"))
    p.add_argument("--top-k", type=int, default=1, help="positions changed per evaluation (top_k)")
    p.add_argument("--no-early-stop", action="store_true", help="always spend S evaluations")
    p.add_argument("--corrector-time", default="tau", choices=("tau", "t"),
                   help="the corrector's time input: sigma(tau_j), tau from 1 towards 0 within a loop "
                        "(the reference), or the current step's sigma(t)")
    p.add_argument("--corrector-guidance", default="conditional", choices=("conditional", "guided"),
                   help="with --guidance: the corrector runs on the conditional model and the step after it "
                        "is unguided (the reference), or everything is guided")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: draw only from the most likely tokens up to cumulative probability p "
                        "(1: off; the reference's OpenWebText evaluation uses 0.9)")
    p.add_argument("--cache-rule", default="reference", choices=("reference", "exact"),
                   help="reuse an output after a step that unmasked nothing (the reference), or only for the "
                        "same input of a model that ignores sigma (exact)")
    p.add_argument("--no-cache", action="store_true", help="never reuse an output")
    p.add_argument("--eta", type=float, default=0.02, help="ReMDM remasking cap")
    p.add_argument("--block-length", type=int, default=8, help="semi_ar, blocks: block size")
    p.add_argument("--threshold", type=float, default=None,
                   help="semi_ar: confidence threshold (default 0.9); blocks: commit every position at or above it "
                        "(Fast-dLLM) instead of k per step (default: off)")
    p.add_argument("--remasking", default="low_confidence", choices=("low_confidence", "random"),
                   help="blocks: commit the most confident k positions per step, or random ones")
    p.add_argument("--temperature", type=float, default=0.0, help="blocks: 0 = argmax proposals, T > 0 = draws at T")
    p.add_argument("--eos-stop", default="block", choices=("block", "any", "off"),
                   help="blocks with --prompts: stop a row when a block ends with EOS (the reference), when a "
                        "block holds an EOS, or never")
    p.add_argument("--prompts", default=None, help="JSONL of prompts to answer ({\"prompt\"} or {\"messages\"})")
    p.add_argument("--gen-length", type=int, default=None, help="with --prompts: positions generated per prompt")
    p.add_argument("--chat-template", default="auto",
                   help="with --prompts: auto, default, none or a .jinja file (as the SFT data was rendered)")
    p.add_argument("--limit", type=int, default=None, help="with --prompts: the first N prompts only")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=None, help="default: 64, with --prompts 8")
    p.add_argument("--length", type=int, default=None, help="default: the training seq_length")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prompt", default=None, help="text whose tokens fix the first positions")
    p.add_argument("--template", default=None, help="fixed text with --blank where to generate")
    p.add_argument("--blank", default="_")
    p.add_argument("--label", type=int, default=None,
                   help="class label of a label-conditioned model (model.num_classes > 0)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance strength gamma with --label (1: plain conditional)")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"),
                   help="a checkpoint's EMA weights when it has them (else the trained ones), or the trained weights")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--out", default=None, help="default: <run dir>/samples/<sampler>_T<steps>_s<seed>.jsonl")
    return p.parse_args(argv)


def build_prompt(args, tokenizer, length):
    """(prompt [1, L], fixed-position mask [1, L]) or (None, None)."""
    import torch

    if args.prompt is None and args.template is None:
        return None, None
    prompt = torch.full((1, length), tokenizer.mask_id, dtype=torch.long)
    fixed = torch.zeros(1, length, dtype=torch.bool)
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt)
        if len(ids) >= length:
            raise ValueError(f"the prompt has {len(ids)} tokens; the sequence only {length}")
        prompt[0, :len(ids)], fixed[0, :len(ids)] = torch.tensor(ids), True
    if args.template is not None:
        pieces = args.template.split(args.blank)
        pos = 0
        for k, piece in enumerate(pieces):
            ids = tokenizer.encode(piece) if piece else []
            if pos + len(ids) > length:
                raise ValueError(f"the template is longer than the sequence ({length} tokens)")
            prompt[0, pos:pos + len(ids)], fixed[0, pos:pos + len(ids)] = torch.tensor(ids, dtype=torch.long), True
            pos += len(ids) + (1 if k < len(pieces) - 1 else 0)
    return prompt, fixed


def conditioning(args, loaded):
    """(denoiser, labels): the plain model, the model given --label, or CFG with --guidance."""
    import torch

    from prosec_mcore.sampling import GuidedDenoiser

    num_classes = getattr(loaded.denoiser, "num_classes", 0)
    if args.label is None:
        if args.guidance is not None:
            raise ValueError("--guidance needs --label (the class to guide towards)")
        return loaded.denoiser, None
    if not num_classes:
        raise ValueError("--label needs a label-conditioned model (trained with model.num_classes > 0)")
    if not 0 <= args.label < num_classes:
        raise ValueError(f"--label {args.label} is outside the model's classes 0..{num_classes - 1}")
    label = torch.tensor([args.label])
    if args.guidance is None:
        return loaded.denoiser, label
    return GuidedDenoiser(loaded.denoiser, label, null_label=num_classes, gamma=args.guidance), None


def output_path(args) -> str:
    """--out, or samples/<sampler>_T<steps>_s<seed>.jsonl beside the run (never inside a checkpoint)."""
    if args.out:
        return args.out
    base = args.model
    if os.path.isfile(os.path.join(base, "COMPLETE")):  # a checkpoint directory: write beside the run, not into it
        base = os.path.dirname(os.path.dirname(os.path.abspath(base)))
    kind = "prompted_" if args.prompts else ""
    return os.path.join(base, "samples", f"{kind}{args.sampler}_T{args.steps}_s{args.seed}.jsonl")


def check_options(args) -> None:
    """Options that are wrong whatever the model: refused before anything is loaded."""
    if not 0.0 < args.top_p <= 1.0:
        raise UserInputError(f"--top-p must be in (0, 1] (1: off), got {args.top_p:g}")
    if args.hf and args.weights != "ema":
        raise UserInputError("--weights applies to distributed checkpoints; a HF folder holds one set of weights")
    if args.prompts is None:
        for flag, value in (("--gen-length", args.gen_length), ("--limit", args.limit)):
            if value is not None:
                raise UserInputError(f"{flag} applies to --prompts (a file of prompts to answer)")
        return
    for flag, value in (("--prompt", args.prompt), ("--template", args.template), ("--label", args.label),
                        ("--length", args.length)):
        if value is not None:
            raise UserInputError(f"{flag} does not combine with --prompts (each row is its prompt, --gen-length "
                                 f"positions and EOS filler)")
    if args.gen_length is None or args.gen_length < 1:
        raise UserInputError("--prompts needs --gen-length N (N >= 1: the positions generated per prompt)")


def check_model(args) -> str:
    """The HF folder or the checkpoint directory to load, once its files are known to be readable:
    a missing or damaged file is then named in one line, not in a loader's traceback."""
    if not args.hf:
        return check_checkpoint(args.model)
    if args.tp != 1:
        raise UserInputError("--tp applies to distributed checkpoints; a HF folder runs on one process")
    check_hf_folder(args.model)
    return args.model


def load_model(args, source: str):
    from prosec_mcore.sampling.loading import load_from_checkpoint, load_from_hf

    if args.hf:
        return load_from_hf(source, seq_length=args.length)
    with reading_checkpoint(source):
        return load_from_checkpoint(source, tp=args.tp, weights=args.weights)


def run_prompted(args, spec, loaded, prompts, path, rank, dp_rank, dp_size) -> int:
    """Answer every prompt (this rank's batches), gather them on rank 0, write the rows and the summary."""
    import torch

    from prosec_mcore.sampling.prompt_files import response_rows, summarize
    from prosec_mcore.sampling.prompted import generate_responses

    batch_size = args.batch_size or 8
    eos_id = loaded.tokenizer.eod

    def progress(done, total):
        if rank == 0:
            print(f"[generate] batch {done}/{total} | {time.time() - start:.1f} s", flush=True)

    if rank == 0:
        print(f"[generate] {loaded.source} ({loaded.weights or 'HF'} weights) | {spec.describe()} | {len(prompts)} "
              f"prompts x {args.gen_length} positions | chat template {args.chat_template} | seed {args.seed} "
              f"| dp {dp_size}", flush=True)
    for p in prompts:
        if loaded.tokenizer.mask_id in p.ids:
            raise UserInputError(f"{p.where}: the rendered prompt holds the mask token; remove it from the text")
    start = time.time()
    results = generate_responses(spec, loaded.denoiser, loaded.schedule, [p.ids for p in prompts], args.gen_length,
                                 eos_id, args.seed, batch_size, dp_rank, dp_size, progress)
    if dp_size > 1:
        from megatron.core import parallel_state

        parts = [None] * dp_size
        torch.distributed.all_gather_object(parts, results, group=parallel_state.get_data_parallel_group())
        results = [next(part[i] for part in parts if part[i] is not None) for i in range(len(prompts))]
    if rank != 0:
        return 0
    summary = {"model": loaded.source, "iteration": loaded.iteration, "weights": loaded.weights, **spec.describe(),
               "prompts_file": args.prompts, "gen_length": args.gen_length, "batch_size": batch_size,
               "seed": args.seed, "chat_template": args.chat_template, "eos_id": eos_id,
               **summarize(results, time.time() - start, args.gen_length)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in response_rows(prompts, results, loaded.tokenizer):
            f.write(json.dumps(row) + "\n")
    with open(path + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[generate] {len(prompts)} responses in {summary['seconds']} s | NFE per prompt "
          f"{summary['nfe_per_prompt']:.1f} (unmask {summary['nfe_unmask_per_prompt']:.1f}, correct "
          f"{summary['nfe_correct_per_prompt']:.1f}), per batch {summary['nfe_per_batch']:.1f} | "
          f"{summary['response_tokens']} response tokens | responses: {path} | summary: {path}.summary.json",
          flush=True)
    return 0


@exits_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    from prosec_mcore import quiet_known_warnings

    quiet_known_warnings()
    # the inputs first, before the slow imports and the work: a bad path fails at once
    check_options(args)
    path = writable_file(output_path(args), "--out")
    source = check_model(args)
    import torch

    from prosec_mcore.sampling import CorrectorSettings, SamplerSpec, generate
    from prosec_mcore.sampling.blocks import check_block_settings
    from prosec_mcore.sampling.prompt_files import read_prompt_records, render_prompts

    with user_input_errors(ValueError):  # here a ValueError is about the options or the model given
        corrector = CorrectorSettings(args.corrector_steps, args.corrector_every, args.corrector_mode, args.top_k,
                                      not args.no_early_stop, time=args.corrector_time,
                                      guidance=args.corrector_guidance)
        spec = SamplerSpec(args.sampler, args.steps, corrector, not args.no_cache, args.eta, args.block_length,
                           args.threshold, top_p=args.top_p, cache_rule=args.cache_rule, remasking=args.remasking,
                           temperature=args.temperature, eos_stop=args.eos_stop)
        if args.prompts and args.sampler == "blocks":
            check_block_settings(args.gen_length, args.steps, args.block_length)
        records = read_prompt_records(args.prompts, args.limit) if args.prompts else None
        loaded = load_model(args, source)
        length = args.length or loaded.seq_length
        prompt, fixed = build_prompt(args, loaded.tokenizer, length)
        denoiser, labels = conditioning(args, loaded)
        prompts = render_prompts(records, loaded.tokenizer, args.chat_template) if records else None

    rank, world, dp_rank, dp_size = 0, 1, 0, 1
    if torch.distributed.is_initialized():
        from megatron.core import parallel_state

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if prompts is not None:
        return run_prompted(args, spec, loaded, prompts, path, rank, dp_rank, dp_size)
    args.batch_size = args.batch_size or 64

    def progress(done, total, seconds):
        if rank == 0:
            print(f"[generate] batch {done}/{total} | {seconds:.1f} s | ETA {seconds / done * (total - done):.0f} s",
                  flush=True)

    if rank == 0:
        print(f"[generate] {loaded.source} ({loaded.weights or 'HF'} weights) | {spec.describe()} "
              f"| {args.num_samples} samples x {length} tokens "
              f"| seed {args.seed} | world {world} (tp {args.tp}, dp {dp_size})", flush=True)
    start = time.time()
    out = generate(spec, denoiser, loaded.schedule, args.num_samples, args.batch_size, length,
                   args.seed, dp_rank, dp_size, prompt, fixed, labels, progress=progress)
    parts = [out]
    if dp_size > 1:
        parts = [None] * dp_size
        torch.distributed.all_gather_object(parts, out, group=parallel_state.get_data_parallel_group())
    if rank != 0:
        return 0

    by_batch = {}
    for part in parts:
        for k, b in enumerate(part["batch_indices"]):
            by_batch[b] = part["tokens"][k * args.batch_size:(k + 1) * args.batch_size]
    tokens = torch.cat([by_batch[b] for b in sorted(by_batch)])
    totals = {k: sum(p["stats"][k] for p in parts) for k in ("nfe", "nfe_unmask", "nfe_correct",
                                                             "corrector_loops", "early_stops", "batches")}
    n_batches = max(totals["batches"], 1)
    summary = {"model": loaded.source, "iteration": loaded.iteration, "weights": loaded.weights, **spec.describe(),
               "num_samples": len(tokens), "batch_size": args.batch_size, "length": length, "seed": args.seed,
               **totals, **{f"{k}_per_batch": totals[k] / n_batches for k in ("nfe", "nfe_unmask", "nfe_correct")},
               "seconds": round(time.time() - start, 2), "prompt": args.prompt, "template": args.template,
               "label": args.label, "guidance": args.guidance}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for i, row in enumerate(tokens.tolist()):
            f.write(json.dumps({"index": i, "text": loaded.tokenizer.decode(row), "tokens": row}) + "\n")
    with open(path + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[generate] {len(tokens)} samples in {summary['seconds']} s | NFE per batch "
          f"{summary['nfe_per_batch']:.1f} (unmask {summary['nfe_unmask_per_batch']:.1f}, correct "
          f"{summary['nfe_correct_per_batch']:.1f}) | samples: {path} | summary: {path}.summary.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
