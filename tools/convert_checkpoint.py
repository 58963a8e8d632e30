"""Convert ProSeCo checkpoints between megatron-core dist checkpoints and Hugging Face folders.

    # any TP/PP layout -> a folder for AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
    python tools/convert_checkpoint.py export --checkpoint runs/b/checkpoints --out hf/proseco-tiny
    # a Hugging Face folder (e.g. a kuleshov-group/proseco-owt or GSAI-ML/LLaDA-8B-Base download)
    # -> a model-only checkpoint to train from (fresh optimizer, iteration 0); prints the overrides
    python tools/convert_checkpoint.py import --hf hf/LLaDA-8B-Base --out runs/from-llada/checkpoints

Families supported: the DiT of the ProSeCo / MDLM reference checkpoints (model.style=dit,
model.time_conditioning=adaln, ffn = 4 x hidden) and the Llama-style LLaDA (model.style=llama,
model.time_conditioning=none). README: "Starting from LLaDA weights".
"""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shell_word(word: str) -> str:
    """`word` as one shell argument, readable: Hydra quotes a value like '<|mdm_mask|>' itself, and
    double quotes keep those quotes for it (shlex.quote when double quotes are not safe)."""
    if shlex.quote(word) == word or any(c in word for c in '"$`\\!'):
        return shlex.quote(word)
    return f'"{word}"'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="dist checkpoint -> Hugging Face folder")
    exp.add_argument("--checkpoint", required=True, help="checkpoint dir, or a run dir / save dir (its latest)")
    exp.add_argument("--out", required=True)
    imp = sub.add_parser("import", help="Hugging Face folder -> model-only dist checkpoint")
    imp.add_argument("--hf", required=True)
    imp.add_argument("--out", required=True, help="save dir to create (then train with checkpoint.load=...)")
    args = parser.parse_args(argv)

    import prosec_mcore

    prosec_mcore.quiet_known_warnings()
    from prosec_mcore.hf.convert import export_to_hf, import_from_hf

    try:
        if args.command == "export":
            info = export_to_hf(args.checkpoint, args.out)
            print(f"[prosec] exported {info['checkpoint']} (iteration {info['iteration']}, {info['tensors']} tensors) "
                  f"to {info['out_dir']}")
            if info["tokenizer"] is None:
                print("[prosec] warning: the run's tokenizer was not found; add its files to the folder yourself")
            print(f"[prosec] load it with AutoModelForMaskedLM.from_pretrained('{info['out_dir']}', trust_remote_code=True)")
        else:
            info = import_from_hf(args.hf, args.out)
            print(f"[prosec] imported {args.hf} into {info['checkpoint']}")
            words = [f"checkpoint.load={info['checkpoint']}"] + info["overrides"]
            print(f"[prosec] train from it with: {' '.join(map(shell_word, words))}")
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # required: dist_checkpointing's writer re-imports the main module
    sys.exit(main())
