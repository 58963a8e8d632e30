"""Convert ProSeCo checkpoints between megatron-core dist checkpoints and Hugging Face folders.

    # any TP/PP layout -> a folder for AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
    # (EMA weights when the checkpoint has them; dtype: the checkpoint's, e.g. bf16 for bf16 runs)
    python tools/convert_checkpoint.py export --checkpoint runs/b/checkpoints --out hf/proseco-tiny
    python tools/convert_checkpoint.py export --checkpoint runs/b --out hf/b-fp32 --dtype fp32 --weights raw
    # a Hugging Face folder (e.g. a kuleshov-group/proseco-owt or GSAI-ML/LLaDA-8B-Base download)
    # -> a model-only checkpoint to train from (fresh optimizer, iteration 0); prints the overrides
    python tools/convert_checkpoint.py import --hf hf/LLaDA-8B-Base --out runs/from-llada/checkpoints

Families supported: the DiT of the ProSeCo / MDLM reference checkpoints (model.style=dit,
model.time_conditioning=adaln, ffn = 4 x hidden) and the Llama-style LLaDA (model.style=llama,
model.time_conditioning=none). Settings of a folder that the megatron model does not implement
are refused by name. docs/hf.md: ids, dtype, sharding, refusals, memory.
"""
import argparse
import shlex
import sys

from prosec_mcore.cli_errors import (
    UserInputError,
    check_checkpoint,
    check_hf_folder,
    exits_on_user_error,
    reading_checkpoint,
    user_input_errors,
    writable_dir,
)


def shell_word(word: str) -> str:
    """`word` as one shell argument, readable: Hydra quotes a value like '<|mdm_mask|>' itself, and
    double quotes keep those quotes for it (shlex.quote when double quotes are not safe)."""
    if shlex.quote(word) == word or any(c in word for c in '"$`\\!'):
        return shlex.quote(word)
    return f'"{word}"'


@exits_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="dist checkpoint -> Hugging Face folder")
    exp.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir / save dir (its latest)")
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                     help="dtype of the written weights (default: the source's for an imported checkpoint, "
                          "else the one the checkpoint stores, e.g. bf16 for bf16 runs)")
    exp.add_argument("--weights", choices=("ema", "raw"), default="ema",
                     help="ema: the checkpoint's EMA weights when it has them (default); raw: the trained weights")
    exp.add_argument("--max-shard-size", default="5GB",
                     help="largest safetensors file; bigger models are sharded with an index (default 5GB)")
    imp = sub.add_parser("import", help="Hugging Face folder -> model-only dist checkpoint")
    imp.add_argument("--hf", required=True)
    imp.add_argument("--out", required=True, help="save dir to create (then train with checkpoint.pretrained=...)")
    args = parser.parse_args(argv)

    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    # a ValueError of the conversion is about the input (an unsupported model_type, weights that
    # do not fit the model, a run tokenizer that does not load)
    with user_input_errors(ValueError):
        if args.command == "export":
            export(args.checkpoint, args.out, args.dtype, args.weights, args.max_shard_size)
        else:
            import_(args.hf, args.out)
    return 0


def export(checkpoint: str, out: str, dtype=None, weights: str = "ema", max_shard_size: str = "5GB") -> None:
    writable_dir(out, "--out")
    from prosec_mcore.hf.shards import parse_size

    try:
        parse_size(max_shard_size)
    except ValueError as err:
        raise UserInputError(f"--max-shard-size: {err}") from None
    path = check_checkpoint(checkpoint)  # a missing or damaged file: one line naming it
    from prosec_mcore.hf.convert import export_to_hf

    with reading_checkpoint(path):
        info = export_to_hf(path, out, dtype=dtype, weights=weights, max_shard_size=max_shard_size)
    print(f"[prosec] exported {info['checkpoint']} (iteration {info['iteration']}, {info['tensors']} tensors, "
          f"{info['dtype']}, {len([f for f in info['files'] if f.endswith('.safetensors')])} shard(s)) "
          f"to {info['out_dir']}")
    ids = ", ".join(f"{k.replace('_token_id', '')} {v}" for k, v in info["ids"].items() if v is not None)
    print(f"[prosec] token ids in config.json and generation_config.json: {ids or 'none known'}")
    if info["tokenizer"] is None:
        print("[prosec] warning: the run's tokenizer was not found; add its files to the folder yourself")
    print(f"[prosec] load it with AutoModelForMaskedLM.from_pretrained('{info['out_dir']}', trust_remote_code=True)")


def import_(hf_dir: str, out: str) -> None:
    check_hf_folder(hf_dir)  # config.json and weights present and readable
    writable_dir(out, "--out")
    from prosec_mcore.hf.convert import import_from_hf

    try:
        info = import_from_hf(hf_dir, out)
    except ValueError as err:  # e.g. an unsupported model_type: say which folder
        raise UserInputError(f"{hf_dir}: {err}") from None
    except KeyError as err:  # the bridges index config.json and the weights by name
        what = err.args[0] if err.args else ""
        raise UserInputError(f"{hf_dir}: {what}" if " " in str(what) else
                             f"{hf_dir}/config.json has no {what!r} entry; is it a supported model?") from None
    print(f"[prosec] imported {hf_dir} ({info['dtype']}) into {info['checkpoint']}")
    if not info["tokenizer"]:
        print(f"[prosec] warning: {hf_dir} has no tokenizer.json; train with the tokenizer the model was trained "
              f"with (data.tokenizer.*)")
    # initial weights, not a resume point: a requeued run continues from its own checkpoints
    words = [f"checkpoint.pretrained={info['checkpoint']}"] + info["overrides"]
    print(f"[prosec] train from it with: {' '.join(map(shell_word, words))}")


if __name__ == "__main__":  # required: dist_checkpointing's writer re-imports the main module
    sys.exit(main())
