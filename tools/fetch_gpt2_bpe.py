"""Fetch GPT-2's BPE rank file (from the openai-whisper sdist on PyPI) for `data.tokenizer.kind=gpt2_bpe`.

    python tools/fetch_gpt2_bpe.py --out-dir data_cache/gpt2
    python tools/preprocess_data.py --input docs.jsonl --tokenizer-kind gpt2_bpe \
        --tokenizer-path data_cache/gpt2/gpt2.tiktoken --output-prefix data/owt
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data_cache/gpt2")
    args = parser.parse_args(argv)
    from prosec_mcore.data.gpt2_bpe import fetch_gpt2_tiktoken

    try:
        path = fetch_gpt2_tiktoken(args.out_dir)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[prosec] GPT-2 BPE rank file: {path} (use data.tokenizer.kind=gpt2_bpe data.tokenizer.path={path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
