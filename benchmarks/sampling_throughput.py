"""Sampling throughput of prompted generation: every sampler setting on the same prompts.

    # a trained SFT checkpoint, Sudoku-style prompts graded by a checker (check(response, record))
    python benchmarks/sampling_throughput.py --checkpoint runs/sudoku-sft --prompts sudoku_test.jsonl \\
        --checker examples/sudoku/checker.py --gen-length 96 --block-length 32 --limit 64
    # the paper's regimes as explicit settings ("sampler key=value ...", corrector.* for the corrector)
    python benchmarks/sampling_throughput.py --checkpoint runs/a --prompts p.jsonl --gen-length 64 \\
        --setting "blocks steps=64 block_length=32" --setting "blocks steps=32 block_length=32 corrector.steps=1"
    # no checkpoint: a tiny random megatron model and synthetic addition prompts (a smoke run, ~1 min on CPU)
    python benchmarks/sampling_throughput.py

For each setting: response tokens per second (up to each EOS) and generated positions per second,
NFE per sample (the network passes each prompt took part in) and per batch, and when the
prompts can be graded (an ``answer`` field: exact match after stripping spaces; or ``--checker``)
the solved fraction and NFE per solved item (all NFE spent / items solved). Prints a Markdown
table and writes the numbers to --out (JSON). One process; timings include the model's forward
passes and the sampler's own work (on CPU the two are comparable for a tiny model).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_settings(gen: int, block: int) -> list[str]:
    """One setting per sampler, and the block sampler at k = 1 and 2 tokens per step, with a
    corrector loop, and with a confidence threshold."""
    return [f"mdlm steps={gen}", f"remdm steps={gen} eta=0.05",
            f"proseco steps={gen // 2} corrector.steps=1 corrector.every=2", f"semi_ar block_length={block}",
            f"blocks steps={gen} block_length={block}", f"blocks steps={gen // 2} block_length={block}",
            f"blocks steps={gen // 2} block_length={block} corrector.steps=1 corrector.every=2",
            f"blocks steps={gen} block_length={block} threshold=0.9"]


def parse_setting(text: str):
    """``"sampler key=value ..."`` -> SamplerSpec; ``corrector.key`` sets the corrector."""
    from dataclasses import fields, replace

    from prosec_mcore.cli_errors import UserInputError
    from prosec_mcore.sampling import CorrectorSettings, SamplerSpec

    words = text.split()
    if not words:
        raise UserInputError("--setting is empty: give 'sampler key=value ...'")
    spec_fields = {f.name: f for f in fields(SamplerSpec)}
    corrector_fields = {f.name: f for f in fields(CorrectorSettings)}
    top, corrector = {}, {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        target, known = (corrector, corrector_fields) if key.startswith("corrector.") else (top, spec_fields)
        name = key.removeprefix("corrector.")
        if not sep or name not in known or name == "corrector":
            raise UserInputError(f"--setting {text!r}: {word!r} is not key=value with a SamplerSpec field "
                                 f"({', '.join(sorted(spec_fields))}) or corrector.<field>")
        target[name] = None if value == "None" else json.loads(value) if value[:1].isdigit() or value in (
            "true", "false") else value
    try:
        spec = SamplerSpec(sampler=words[0], **top)
        return replace(spec, corrector=CorrectorSettings(**corrector))
    except (TypeError, ValueError) as err:
        raise UserInputError(f"--setting {text!r}: {err}") from None


def synthetic_prompts(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    pairs = [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n)]
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


def random_model(seq_length: int, seed: int):
    """A tiny randomly initialised megatron model and a char tokenizer: the real sampling path
    (megatron forward, vocabulary padding, sub-batches) without a checkpoint."""
    import string

    from prosec_mcore.config_loader import load_config
    from prosec_mcore.data.tokenizer import CharTokenizer
    from prosec_mcore.diffusion.schedules import build_schedule
    from prosec_mcore.model.builder import build_model
    from prosec_mcore.runtime.distributed import initialize_distributed
    from prosec_mcore.sampling import megatron_denoiser
    from prosec_mcore.sampling.loading import LoadedModel

    tokenizer = CharTokenizer(string.printable)
    cfg = load_config(["model=tiny", "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
                       "model.time_embedding_dim=16", f"model.max_sequence_length={max(128, seq_length)}",
                       f"data.seq_length={seq_length}"])
    initialize_distributed(tp=1, pp=1, seed=seed)
    model = build_model(cfg, tokenizer.vocab_size)
    denoiser = megatron_denoiser(model, tokenizer.vocab_size, tokenizer.mask_id)
    schedule = build_schedule(cfg.objective.schedule, cfg.objective.schedule_eps)
    return LoadedModel(denoiser, schedule, tokenizer, seq_length, "random tiny model", cfg)


def grade(records, responses, check) -> list:
    """Per item a score in [0, 1] (None when it cannot be graded)."""
    scores = []
    for record, response in zip(records, responses):
        if check is not None:
            scores.append(float(check(response, record)))
        elif record.get("answer") is not None:
            scores.append(float(response.strip() == str(record["answer"]).strip()))
        else:
            scores.append(None)
    return scores


def run(args) -> dict:
    import torch

    from prosec_mcore.cli_errors import UserInputError
    from prosec_mcore.sampling.loading import load_from_checkpoint, load_from_hf
    from prosec_mcore.sampling.prompt_files import (load_checker, prompt_messages, read_prompt_records,
                                                    render_prompts, summarize)
    from prosec_mcore.sampling.prompted import generate_responses

    torch.set_num_threads(args.threads)
    check = load_checker(args.checker) if args.checker else None
    if args.prompts:
        records = read_prompt_records(args.prompts, args.limit)
    else:
        made = synthetic_prompts(args.limit or 16, args.seed)
        records = [(f"synthetic {i}", r, prompt_messages(r, f"synthetic {i}")) for i, r in enumerate(made)]
    specs = [(text, parse_setting(text)) for text in args.setting or default_settings(args.gen_length,
                                                                                         args.block_length)]
    if args.checkpoint:
        loaded = load_from_checkpoint(args.checkpoint)
    elif args.hf:
        loaded = load_from_hf(args.hf)
    else:
        loaded = random_model(256, args.seed)
    prompts = render_prompts(records, loaded.tokenizer, args.chat_template if args.prompts else "none")
    ids = [p.ids for p in prompts]
    if max(map(len, ids)) + args.gen_length > loaded.seq_length and args.checkpoint:
        print(f"[sampling] note: prompts + gen length exceed the trained length {loaded.seq_length}", flush=True)
    eos = loaded.tokenizer.eod
    for text, spec in specs:
        if spec.sampler == "blocks" and args.gen_length % spec.block_length:
            raise UserInputError(f"--setting {text!r}: --gen-length {args.gen_length} is not a multiple of "
                                 f"block_length {spec.block_length}")
    generate_responses(specs[0][1], loaded.denoiser, loaded.schedule, ids[:1], args.gen_length, eos, args.seed, 1)
    rows = []
    for text, spec in specs:
        start = time.perf_counter()
        results = generate_responses(spec, loaded.denoiser, loaded.schedule, ids, args.gen_length, eos, args.seed,
                                     args.batch_size)
        seconds = time.perf_counter() - start
        responses = [loaded.tokenizer.decode(r["ids"]) for r in results]
        scores = grade([p.record for p in prompts], responses, check)
        row = {"setting": text, **spec.describe(), **summarize(results, seconds, args.gen_length)}
        graded = [s for s in scores if s is not None]
        if graded:
            solved = sum(s >= 1.0 for s in graded)
            row.update(graded=len(graded), solved=solved, solved_fraction=solved / len(graded),
                       mean_score=sum(graded) / len(graded),
                       nfe_per_solved=sum(r["nfe"] for r in results) / solved if solved else None)
        rows.append(row)
        print(f"[sampling] {text}: {seconds:.2f} s", flush=True)
    return {"model": loaded.source, "prompts": args.prompts or "synthetic additions", "items": len(ids),
            "gen_length": args.gen_length, "batch_size": args.batch_size, "seed": args.seed,
            "threads": args.threads, "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "rows": rows}


def table(result: dict) -> str:
    graded = any("graded" in r for r in result["rows"])
    head = ["setting", "NFE/sample", "NFE/batch", "tokens/s", "positions/s", "s"]
    head += ["solved", "score", "NFE/solved"] if graded else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["setting"], f"{r['nfe_per_prompt']:.1f}", f"{r['nfe_per_batch']:.1f}",
                 f"{r['tokens_per_second']:.1f}", f"{r['positions_per_second']:.1f}", f"{r['seconds']:.2f}"]
        if graded:
            cells += [f"{r.get('solved', 0)}/{r.get('graded', 0)}", f"{r.get('mean_score', 0):.3f}",
                      "n/a" if r.get("nfe_per_solved") is None else f"{r['nfe_per_solved']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from prosec_mcore.cli_errors import exits_on_user_error, writable_file

    @exits_on_user_error
    def go():
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        model = p.add_mutually_exclusive_group()
        model.add_argument("--checkpoint", help="a distributed checkpoint or run dir (default: a tiny random model)")
        model.add_argument("--hf", help="an exported Hugging Face folder")
        p.add_argument("--prompts", help="JSONL of prompts (prompt or messages; optional answer)")
        p.add_argument("--checker", help="a Python file with check(response: str, record: dict) -> bool or score")
        p.add_argument("--chat-template", default="auto", help="auto, default, none or a .jinja file")
        p.add_argument("--setting", action="append", help="'sampler key=value ...' (repeat; default: one per sampler)")
        p.add_argument("--gen-length", type=int, default=32)
        p.add_argument("--block-length", type=int, default=8, help="of the default settings")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--limit", type=int, default=None, help="the first N prompts (synthetic: 16)")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
        p.add_argument("--out", default="runs/sampling_throughput.json")
        args = p.parse_args(argv)
        import prosec_mcore

        prosec_mcore.quiet_known_warnings()
        writable_file(args.out, "--out")
        result = run(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\n{result['model']} | {result['items']} items x {result['gen_length']} positions | batch "
              f"{result['batch_size']} | {result['device']}, {result['threads']} thread(s)\n")
        print(table(result))
        print(f"\nwritten: {args.out}")
        return 0

    return go()


if __name__ == "__main__":
    sys.exit(main())
