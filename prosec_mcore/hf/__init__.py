"""Hugging Face conversion: one small bridge file per architecture family.

    dit_bridge.py   the ProSeCo / MDLM reference DiT (kuleshov-group/proseco-owt layout);
                    modeling code shipped with exported folders lives in dit/
"""
