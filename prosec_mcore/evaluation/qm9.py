"""Everything needed to score generated QM9 samples, loaded once.

Novelty is judged against the molecules of the *train* split (the documents megatron trained
on, see ``data/qm9.py``), FCD against the held-out molecules after them (the validation split),
so the reference set was never trained on. The canonical training set and the reference's
ChemNet statistics are cached under ``<data_dir>/eval_cache``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .molecules import CanonicalSmilesSet, FCDScorer, MoleculeMetrics, canonical_training_set, evaluate_molecules


@dataclass
class QM9Evaluation:
    tokenizer: object
    train_set: CanonicalSmilesSet
    reference: tuple           # (mu, sigma) of ChemNet activations of held-out molecules
    scorer: FCDScorer

    def smiles(self, token_rows) -> list[str]:
        from ..data.qm9 import decode_molecule

        return [decode_molecule(row, self.tokenizer) for row in token_rows]

    def score(self, token_rows) -> MoleculeMetrics:
        """Metrics of generated token sequences (one molecule each, read up to the first special id)."""
        return evaluate_molecules(self.smiles(token_rows), self.train_set, self.reference, self.scorer)


def load_qm9_evaluation(data_dir: str, split: str = "95,5,0", num_reference: int = 5000) -> QM9Evaluation:
    """The tokenizer, canonical training set and FCD reference of a folder prepared by
    ``tools/prepare_data.py --dataset qm9``, for the training run's ``data.split``."""
    from ..data import build_tokenizer
    from ..data.qm9 import SMILES_FILE, training_smiles

    train = training_smiles(data_dir, split)
    with open(os.path.join(data_dir, SMILES_FILE)) as f:
        held_out = f.read().split()[len(train):]
    if len(held_out) < 2:
        raise ValueError(f"split {split!r} leaves {len(held_out)} held-out molecules in {data_dir}; FCD needs some")
    cache = os.path.join(data_dir, "eval_cache")
    scorer = FCDScorer(num_threads=1)
    return QM9Evaluation(build_tokenizer("auto", data_dir), canonical_training_set(train, cache_dir=cache),
                         scorer.reference_statistics(held_out[:num_reference], cache_dir=cache), scorer)
