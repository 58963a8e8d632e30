"""Hugging Face conversion: one small bridge file per architecture family.

    dit_bridge.py   the ProSeCo / MDLM reference DiT (kuleshov-group/proseco-owt layout);
                    modeling code shipped with exported folders lives in dit/
    llada_bridge.py the Llama-style LLaDA (GSAI-ML/LLaDA-8B-Base layout); modeling code in llada/

Every bridge offers MODEL_TYPE, MODELING_SUBDIR/MODELING_FILES, hf_config, model_overrides,
vocab_size, megatron_to_hf and hf_to_megatron; convert.py picks one by model.style or by the
folder's config.json model_type.
"""
