"""Hugging Face conversion: one small bridge file per architecture family (docs/hf.md).

    dit_bridge.py   the ProSeCo / MDLM reference DiT (kuleshov-group/proseco-owt layout);
                    modeling code shipped with exported folders lives in dit/
    llada_bridge.py the Llama-style LLaDA (GSAI-ML/LLaDA-8B-Base layout); modeling code in llada/
    convert.py      export (checkpoint -> folder) and import (folder -> checkpoint)
    shards.py       safetensors shards read and written one tensor at a time; dtypes, sizes
    tokens.py       the tokenizer files and the bos/eos/pad/mask ids, both ways

Every bridge offers MODEL_TYPE, MODELING_SUBDIR/MODELING_FILES, AUTO_MAP, resolve_config (the
family's defaults and derived fields), check_supported (refusals by key), model_overrides,
vocab_size, hf_config, hf_names, export_tensors / import_tensor (one tensor at a time) and the
whole-state helpers megatron_to_hf / hf_to_megatron; convert.py picks one by model.style or by
the folder's config.json model_type.
"""
