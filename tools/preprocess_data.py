"""Tokenize text into megatron-core indexed dataset files (<prefix>.bin / <prefix>.idx), or into
tokenized webdataset shards (--output-format webdataset: <dir>/manifest.json + <split>-NNNNNN.tar,
samples of --seq-length tokens, split into train/valid/test by --split; data/shards.py), or SFT
examples into indexed files with per-token roles (--sft; data/sft.py, docs/sft.md).

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

    # SFT examples (JSONL: prompt/response or chat messages), one sample of --seq-length tokens each,
    # with per-token roles (prompt / response / padding); train with data.format=sft (docs/sft.md)
    python tools/preprocess_data.py --sft --input train.jsonl --tokenizer-path hf/LLaDA-8B-Instruct \
        --eod-token '<|endoftext|>' --mask-token '<|mdm_mask|>' --seq-length 1024 --output-prefix data/chat_sft

    # shards for data.loader=webdataset|dali: train with data.shards=[data/shards/manifest.json]
    python tools/preprocess_data.py --input corpus.jsonl --tokenizer-path data_cache/shakespeare/tokenizer.json \\
        --output-format webdataset --output-dir data/shards --seq-length 128 --split 90,10,0 --shard-bytes 256M
"""

import argparse
import glob
import os
import re
import sys
import warnings

from prosec_mcore.cli_errors import (
    UserInputError,
    exits_on_user_error,
    iter_jsonl,
    reading_tokenizer,
    user_input_errors,
    writable_dir,
    writable_file,
)

# megatron-core announces its optional GPU extras on import; irrelevant for preprocessing
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

TEXT_EXT, JSON_EXT = (".txt",), (".jsonl", ".json")
JSONL_HINT = "a .jsonl input holds one JSON object per line, with the text under --json-key"


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
            raise UserInputError(f"--input {item} not found")
    if not files:
        raise UserInputError(f"no .txt/.jsonl/.json files in {' '.join(inputs)}")
    return files


def no_documents(files, why) -> UserInputError:
    named = " ".join(files) if len(files) <= 3 else f"{files[0]} and the {len(files) - 1} other inputs"
    return UserInputError(f"{named} {'holds' if len(files) == 1 else 'hold'} no documents ({why})")


def document_text(path, lineno, record, key) -> str:
    if not isinstance(record[key], str):
        raise UserInputError(f"{path} line {lineno}: {key!r} is a JSON {type(record[key]).__name__}, not text; "
                             f"{JSONL_HINT}")
    return record[key]


def check_inputs(files, json_key) -> None:
    """A quick look before the tokenizer loads (seconds): the first record of every JSON-lines
    file, the first 64 KiB of every text file, and that not every file is empty. A wrong
    --json-key, a binary file or empty inputs then fail at once; the rest is checked as it
    streams by (Documents)."""
    import codecs

    content = False
    for path in files:
        if path.endswith(JSON_EXT):
            for lineno, record in iter_jsonl(path, key=json_key, hint=JSONL_HINT):
                document_text(path, lineno, record, json_key)
                content = True
                break
            continue
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        try:  # an incremental decoder accepts a character cut at the end of the 64 KiB
            content = content or bool(codecs.getincrementaldecoder("utf-8")().decode(head).strip())
        except UnicodeDecodeError:
            raise UserInputError(f"{path} is not UTF-8 text (a binary file?)") from None
    if not content:
        raise no_documents(files, "empty")


def byte_size(text: str) -> int:
    """--shard-bytes: a number of bytes, optionally with a K/M/G/T suffix (powers of 1000) or
    KiB/MiB/GiB/TiB (powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)(i?)b?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 268435456, 256M or 256MiB")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " kmgt".index(unit.lower() or " "))


def check_sft_options(args, files) -> None:
    """--sft: JSON-lines inputs, indexed output with --output-prefix, --seq-length; the first
    record of every input is checked before the tokenizer loads."""
    from prosec_mcore.data.chat_template import split_example

    if args.output_format != "indexed" or args.output_dir or args.samples_per_shard or args.shard_bytes:
        raise UserInputError("--sft writes indexed files (<prefix>.bin/.idx with <prefix>_roles.bin/.idx): drop "
                             "--output-format webdataset / --output-dir / the shard options")
    if args.output_prefix is None:
        raise UserInputError("--sft needs --output-prefix (writes <prefix>.bin/.idx, <prefix>_roles.bin/.idx and "
                             "<prefix>_sft.json)")
    if args.seq_length is None or args.seq_length < 2:
        raise UserInputError("--sft needs --seq-length >= 2: every example becomes one sample of exactly that many "
                             "tokens (data.seq_length must equal it)")
    if any(not f.endswith(JSON_EXT) for f in files):
        raise UserInputError(f"--sft reads JSON-lines files, not {next(f for f in files if not f.endswith(JSON_EXT))}")
    writable_file(args.output_prefix, "--output-prefix")
    for path in files:
        for lineno, record in iter_jsonl(path, hint="an SFT input holds one example per line"):
            split_example(record, f"{path} line {lineno}")
            break


def write_sft(args, files, tokenizer) -> int:
    """Tokenize the examples into the SFT files (data/sft.py) and say what was written."""
    from prosec_mcore.data.sft import describe_sft_stats, iter_sft_records, write_sft_dataset

    stats = write_sft_dataset(iter_sft_records(files), tokenizer, args.output_prefix, args.seq_length,
                              template=args.chat_template or "auto", overlong=args.overlong or "refuse",
                              show_progress=not args.no_progress)
    for line in describe_sft_stats(stats):
        print(line)
    for path in stats["files"]:
        print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    print(f"train with data.format=sft data.data_prefix={args.output_prefix} data.seq_length={args.seq_length}")
    return 0


def check_output_options(args) -> None:
    """--output-prefix for indexed files; --output-dir, --seq-length and a shard size for shards."""
    shard_options = {"--output-dir": args.output_dir, "--seq-length": args.seq_length,
                     "--samples-per-shard": args.samples_per_shard, "--shard-bytes": args.shard_bytes}
    if args.output_format == "indexed":
        given = [name for name, value in shard_options.items() if value is not None]
        if given:
            raise UserInputError(f"{given[0]} is for --output-format webdataset; drop it or add --output-format "
                                 f"webdataset")
        if args.output_prefix is None:
            raise UserInputError("--output-prefix is required (writes <prefix>.bin and <prefix>.idx)")
        writable_file(args.output_prefix, "--output-prefix")
        return
    if args.output_prefix is not None:
        raise UserInputError("--output-format webdataset writes a folder: give --output-dir instead of "
                             "--output-prefix")
    if args.output_dir is None:
        raise UserInputError("--output-format webdataset needs --output-dir (the shard set's folder)")
    if args.seq_length is None or args.seq_length < 1:
        raise UserInputError("--output-format webdataset needs --seq-length >= 1 (tokens per sample; "
                             "data.seq_length must equal it)")
    if args.samples_per_shard is None and args.shard_bytes is None:
        raise UserInputError("--output-format webdataset needs --samples-per-shard and/or --shard-bytes "
                             "(a shard closes at whichever comes first)")
    for name in ("--samples-per-shard", "--shard-bytes"):
        if shard_options[name] is not None and shard_options[name] < 1:
            raise UserInputError(f"{name} must be >= 1, got {shard_options[name]}")
    from prosec_mcore.data.shards import check_split

    try:
        check_split(args.split)
    except ValueError:
        raise UserInputError(f"--split {args.split!r} is not up to three non-negative shares with a positive sum, "
                             f"like 90,10,0") from None
    writable_dir(args.output_dir, "--output-dir")


class Documents:
    """The documents of every input file in order, remembering which file is being read and how
    many non-blank documents came: the tokenizer's and the writer's errors do not know the file,
    and preprocess_documents' "no documents" names no input."""

    def __init__(self, text_files, json_files, args):
        self.text_files, self.json_files, self.args = text_files, json_files, args
        self.current, self.count = None, 0

    def __iter__(self):
        from prosec_mcore.data.preprocess import iter_text_documents

        for path in self.text_files:
            self.current = path
            try:
                yield from self._counted(iter_text_documents([path], split_blank_lines=self.args.split_blank_lines,
                                                             split_lines=self.args.split_lines))
            except UnicodeDecodeError:
                raise UserInputError(f"{path} is not UTF-8 text (a binary file?)") from None
        key = self.args.json_key
        for path in self.json_files:
            self.current = path
            for lineno, record in iter_jsonl(path, key=key, hint=JSONL_HINT):
                yield from self._counted([document_text(path, lineno, record, key)])

    def _counted(self, docs):
        for doc in docs:
            self.count += bool(doc.strip())
            yield doc


@exits_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files and/or folders")
    parser.add_argument("--output-format", default="indexed", choices=["indexed", "webdataset"],
                        help="indexed: <prefix>.bin/.idx; webdataset: tar shards and a manifest in --output-dir")
    parser.add_argument("--output-prefix", default=None,
                        help="indexed: writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--output-dir", default=None, help="webdataset: the shard set's folder")
    parser.add_argument("--seq-length", type=int, default=None, help="webdataset and --sft: tokens per sample")
    parser.add_argument("--split", default="90,10,0",
                        help="webdataset: train,valid,test shares of the documents (megatron's data.split)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="webdataset: a shard closes at this many samples ...")
    parser.add_argument("--shard-bytes", type=byte_size, default=None,
                        help="webdataset: ... or before it passes this size (e.g. 256M, 1GiB)")
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
    parser.add_argument("--sft", action="store_true",
                        help="JSONL examples (prompt/response or messages) -> one SFT sample each (data/sft.py)")
    parser.add_argument("--chat-template", default=None,
                        help="--sft: auto (default: the tokenizer's own, else default), default, none, or a .jinja file")
    parser.add_argument("--overlong", default=None, choices=["refuse", "truncate"],
                        help="--sft: an example longer than --seq-length stops the run (refuse, the default) or "
                             "is truncated (the prompt's end and the response's start are kept)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    # the paths and the inputs' first lines before the slow imports: a bad one fails at once
    files = expand_inputs(args.input)
    if not os.path.exists(args.tokenizer_path):
        raise UserInputError(f"--tokenizer-path {args.tokenizer_path} not found; "
                             f"tools/prepare_data.py writes a tokenizer.json")
    if args.sft:
        check_sft_options(args, files)
    elif args.chat_template is not None or args.overlong is not None:
        raise UserInputError("--chat-template and --overlong are options of --sft; add --sft or drop them")
    else:
        check_output_options(args)
        check_inputs(files, args.json_key)
    from prosec_mcore.data.preprocess import preprocess_documents
    from prosec_mcore.data.tokenizer import build_tokenizer

    with user_input_errors(ValueError), reading_tokenizer(args.tokenizer_path):
        tokenizer = build_tokenizer(args.tokenizer_kind, args.tokenizer_path, eod_token=args.eod_token,
                                    mask_token=args.mask_token, pad_token=args.pad_token)
    print(f"tokenizer: {tokenizer}")
    if args.sft:
        return write_sft(args, files, tokenizer)
    text_files = [f for f in files if not f.endswith(JSON_EXT)]
    json_files = [f for f in files if f.endswith(JSON_EXT)]
    docs = Documents(text_files, json_files, args)
    print(f"inputs: {len(text_files)} text file(s), {len(json_files)} JSONL file(s)")
    if args.output_format == "webdataset":
        return write_webdataset(args, docs, tokenizer, files)
    try:
        stats = preprocess_documents(docs, tokenizer, args.output_prefix,
                                     show_progress=not args.no_progress)
    except UserInputError:
        raise
    except ValueError as err:  # unknown characters for a char vocabulary, ids beyond the vocabulary
        if docs.count == 0:
            raise no_documents(files, f"blank texts or --json-key {args.json_key!r} values") from None
        raise UserInputError(f"{docs.current}: {err}") from None
    print(f"documents: {stats['documents']:,} (skipped {stats['skipped_empty']} empty)")
    print(f"tokens:    {stats['tokens']:,} incl. EOD, dtype {stats['dtype']}, "
          f"max id {stats['max_token_id']}, {stats['seconds']:.1f}s")
    for key in ("bin_path", "idx_path"):
        print(f"wrote {stats[key]} ({os.path.getsize(stats[key]):,} bytes)")
    return 0


def write_webdataset(args, docs, tokenizer, files) -> int:
    """Tokenize as the indexed path does (blank documents skipped, EOD appended) and pack the
    documents into shards (data/shards.py)."""
    import time

    from tqdm import tqdm

    from prosec_mcore.data.shards import tokenized_documents, write_shards

    def tokenized():  # a tokenizer error (an unknown character, an id beyond the vocabulary) names the file
        try:
            yield from tokenized_documents(tqdm(docs, unit="doc", desc="tokenizing", disable=args.no_progress),
                                           tokenizer)
        except UserInputError:
            raise
        except ValueError as err:
            raise UserInputError(f"{docs.current}: {err}") from None

    start = time.time()
    try:
        manifest = write_shards(tokenized(), args.output_dir, args.seq_length, args.split, tokenizer.vocab_size,
                                tokenizer.eod, samples_per_shard=args.samples_per_shard, shard_bytes=args.shard_bytes,
                                tokenizer=args.tokenizer_path)
    except UserInputError:
        raise
    except ValueError as err:  # no documents, a split without one train sample, a bad --split
        if docs.count == 0:
            raise no_documents(files, f"blank texts or --json-key {args.json_key!r} values") from None
        raise UserInputError(f"{args.output_dir}: {err}") from None
    print(f"documents: {docs.count:,}, split {args.split}; samples of {args.seq_length} tokens, dtype "
          f"{manifest['dtype']}, {time.time() - start:.1f}s")
    for split, shards in manifest["splits"].items():
        samples = sum(entry["samples"] for entry in shards)
        size = sum(entry["bytes"] for entry in shards)
        print(f"{split:5s}: {len(shards):,} shard(s), {samples:,} samples, {samples * args.seq_length:,} tokens, "
              f"{size:,} bytes")
    print(f"wrote {os.path.join(args.output_dir, 'manifest.json')} and the shards beside it "
          f"(train with data.loader=webdataset data.shards=[{os.path.join(args.output_dir, 'manifest.json')}])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
