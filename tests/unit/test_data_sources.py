"""data/sources.py: which source the config names, the one-line refusals of contradictory data
keys, and the data identity a checkpoint records (what a resume compares)."""
import pytest

from prosec_mcore.config_loader import load_config
from prosec_mcore.data.sources import build_run_data, data_state, data_state_changes


class _Tokenizer:
    vocab_size = 4096


@pytest.mark.parametrize("overrides,message", [
    (["data.loader=webdataset"], "data.loader=webdataset needs data.shards"),
    (["data.loader=dali", "data.data_prefix=x", "data.shards=[m.json]"], "drop them, or set data.loader=indexed"),
    (["data.shards=[m.json]"], "set data.loader=webdataset"),
    (["data.loader=webdataset", "data.shards=[m.json]", "data.labels=l.npy"], "data.labels"),
])
def test_contradictory_data_keys_are_refused_in_one_line(overrides, message):
    cfg = load_config(overrides)
    with pytest.raises(ValueError, match=message) as err:
        build_run_data(cfg, _Tokenizer(), (8, 0, 0), "unused")
    assert "\n" not in str(err.value)


def test_data_identity_changes_are_named_and_old_checkpoints_pass():
    identity = {"loader": "indexed", "sources": {"blend": [["a", "b"], [0.5, 0.5]]}, "seed": 1}
    saved = data_state(identity, iteration=3, global_batch_size=8)
    assert saved == {"identity": identity, "next_sample": 24}
    assert data_state_changes(saved, dict(identity)) == []
    assert data_state_changes(None, identity) == []  # a checkpoint from before data states
    changed = {**identity, "sources": {"blend": [["a", "c"], [0.5, 0.5]]}}
    (line,) = data_state_changes(saved, changed)
    assert line.startswith("sources: ") and "'c'" in line
    many = {**identity, "sources": {"blend": [[f"prefix_{i}" for i in range(3000)], None]}}
    (long_line,) = data_state_changes(saved, many)
    assert len(long_line) < 400  # thousands of prefixes stay one readable line


class _Stream:
    """A shard source's position interface (ShardDataset.position): stream v at stream position q."""

    streams = 2

    def position(self, i):
        return {"stream": (i % 8) // 4, "stream_position": (i // 8) * 4 + i % 4}


def test_data_state_records_where_each_stream_stands():
    state = data_state({"loader": "webdataset"}, iteration=5, global_batch_size=8, train_source=_Stream())
    assert state["next_sample"] == 40
    assert state["next_positions"] == [{"stream": 0, "stream_position": 20}, {"stream": 1, "stream_position": 20}]
