"""Tokenize text into megatron-core indexed dataset files (<prefix>.bin / <prefix>.idx).

Inputs (files or folders; folders are searched for *.txt, *.jsonl and *.json):
    *.txt            one document per file; with --split-blank-lines one document per
                     block of lines separated by blank lines; with --split-lines one
                     document per non-empty line (e.g. one SMILES string per line)
    *.jsonl / *.json one JSON object per line; the document is record[--json-key]

Every document is followed by the tokenizer's end-of-document id.  Examples:

    python tools/preprocess_data.py --input corpus.jsonl --json-key text \\
        --tokenizer-kind hf_json --tokenizer-path data_cache/shakespeare/tokenizer.json \\
        --output-prefix data_cache/mydata/mydata_text_document

    python tools/preprocess_data.py --input smiles.txt --split-lines \\
        --tokenizer-kind char --tokenizer-path smiles_chars.txt --output-prefix data_cache/smiles

    # a pretrained model's tokenizer (a Hugging Face folder with tokenizer.json), naming its tokens
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-path hf/LLaDA-8B-Base \\
        --eod-token '<|endoftext|>' --mask-token '<|mdm_mask|>' --output-prefix data/llada_text_document
"""

import argparse
import glob
import itertools
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core announces its optional GPU extras on import; irrelevant for preprocessing
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

TEXT_EXT, JSON_EXT = (".txt",), (".jsonl", ".json")


def expand_inputs(inputs):
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for ext in TEXT_EXT + JSON_EXT
                           for p in glob.glob(os.path.join(item, "**", "*" + ext), recursive=True))
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item!r}")
    if not files:
        raise FileNotFoundError(f"no .txt/.jsonl/.json files in {inputs}")
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files and/or folders")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--tokenizer-kind", default="hf_json",
                        choices=["hf_json", "gpt2_bpe", "char", "auto"])
    parser.add_argument("--tokenizer-path", required=True)
    parser.add_argument("--eod-token", default=None, help="hf_json: name of the end-of-document token")
    parser.add_argument("--mask-token", default=None, help="hf_json: name of an existing mask token")
    parser.add_argument("--pad-token", default=None, help="hf_json: name of the padding token")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--split-blank-lines", action="store_true",
                        help=".txt: documents are separated by blank lines")
    parser.add_argument("--split-lines", action="store_true",
                        help=".txt: every non-empty line is a document")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from prosec_mcore.data.preprocess import (
        iter_jsonl_documents,
        iter_text_documents,
        preprocess_documents,
    )
    from prosec_mcore.data.tokenizer import build_tokenizer

    try:
        files = expand_inputs(args.input)
        tokenizer = build_tokenizer(args.tokenizer_kind, args.tokenizer_path, eod_token=args.eod_token,
                                    mask_token=args.mask_token, pad_token=args.pad_token)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    text_files = [f for f in files if not f.endswith(JSON_EXT)]
    json_files = [f for f in files if f.endswith(JSON_EXT)]
    docs = itertools.chain(
        iter_text_documents(text_files, split_blank_lines=args.split_blank_lines,
                            split_lines=args.split_lines),
        iter_jsonl_documents(json_files, args.json_key),
    )
    print(f"tokenizer: {tokenizer}")
    print(f"inputs: {len(text_files)} text file(s), {len(json_files)} JSONL file(s)")
    try:
        stats = preprocess_documents(docs, tokenizer, args.output_prefix,
                                     show_progress=not args.no_progress)
    except (KeyError, ValueError) as err:  # bad JSONL key, unknown characters, no documents
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"documents: {stats['documents']:,} (skipped {stats['skipped_empty']} empty)")
    print(f"tokens:    {stats['tokens']:,} incl. EOD, dtype {stats['dtype']}, "
          f"max id {stats['max_token_id']}, {stats['seconds']:.1f}s")
    for key in ("bin_path", "idx_path"):
        print(f"wrote {stats[key]} ({os.path.getsize(stats[key]):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
