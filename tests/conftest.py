"""Shared fixtures: a single-process megatron-core world (TP=1, PP=1, gloo on CPU)."""
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(scope="session")
def single_process_world():
    from prosec_mcore.runtime import destroy_distributed, initialize_distributed

    initialize_distributed(tp=1, pp=1, seed=1234)
    yield
    destroy_distributed()
