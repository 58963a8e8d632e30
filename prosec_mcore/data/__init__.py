"""Data layer: tokenizers, corpus preparation, indexed-dataset preprocessing, and the
train/valid/test datasets with a deterministic global-batch iterator.

Typical flow::

    prepare_shakespeare_corpus("data_cache/shakespeare")        # tokenizer + .bin/.idx
    tok = build_tokenizer("hf_json", "data_cache/shakespeare/tokenizer.json")
    train, valid, test = build_datasets("data_cache/shakespeare/shakespeare_text_document",
                                        tok, seq_length=256, split="969,30,1", seed=1234,
                                        num_samples=(G * iters, G * eval_iters, 0),
                                        cache_dir="runs/x/data_index_cache")
    batches = make_batch_iterator(train, G, m, dp_rank, dp_size, start_iteration)

Supervised fine-tuning data (one example per sample, with prompt and padding masks) is written by
``write_sft_dataset`` / ``tools/preprocess_data.py --sft`` and read by ``SFTDataset`` (data/sft.py);
prompts are rendered by data/chat_template.py.

Heavy dependencies (megatron-core, tokenizers) are imported lazily inside functions
where practical.
"""

from prosec_mcore.data.corpus import prepare_shakespeare_corpus, strip_gutenberg_boilerplate
from prosec_mcore.data.multisource import SOURCES as MULTISOURCE_SOURCES, prepare_multisource_corpus
from prosec_mcore.data.batches import GlobalBatchIterator, load_document_labels, make_batch_iterator
from prosec_mcore.data.datasets import build_datasets, check_indexed_dataset_files, validate_indexed_dataset
from prosec_mcore.data.blends import (
    DataSources,
    data_sources_from_config,
    is_single_prefix,
    parse_blend,
    require_single_prefix,
    validate_blend_prefixes,
)
from prosec_mcore.data.preprocess import (
    iter_jsonl_documents,
    iter_text_documents,
    preprocess_documents,
)
from prosec_mcore.data.shards import check_shards, read_manifest, write_shards
from prosec_mcore.data.chat_template import encode_prompt, render_prompt, split_example
from prosec_mcore.data.sft import SFTDataset, write_sft_dataset
from prosec_mcore.data.shard_dataset import ShardBlend, ShardDataset, build_shard_source
from prosec_mcore.data.tokenizer import (
    EOD_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    CharTokenizer,
    HFTokenizer,
    ProSeCoTokenizer,
    build_tokenizer,
)

__all__ = [
    "EOD_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "CharTokenizer",
    "DataSources",
    "GlobalBatchIterator",
    "HFTokenizer",
    "MULTISOURCE_SOURCES",
    "ProSeCoTokenizer",
    "SFTDataset",
    "ShardBlend",
    "ShardDataset",
    "build_datasets",
    "build_shard_source",
    "build_tokenizer",
    "check_indexed_dataset_files",
    "check_shards",
    "data_sources_from_config",
    "encode_prompt",
    "is_single_prefix",
    "iter_jsonl_documents",
    "iter_text_documents",
    "load_document_labels",
    "make_batch_iterator",
    "parse_blend",
    "prepare_multisource_corpus",
    "prepare_shakespeare_corpus",
    "preprocess_documents",
    "read_manifest",
    "render_prompt",
    "require_single_prefix",
    "split_example",
    "strip_gutenberg_boilerplate",
    "validate_blend_prefixes",
    "validate_indexed_dataset",
    "write_sft_dataset",
    "write_shards",
]
