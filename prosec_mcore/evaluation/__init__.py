"""Evaluation metrics for samples of the diffusion LM.

* ``molecules``: validity, uniqueness, novelty, QED, ring count and Frechet ChemNet Distance of
  generated SMILES (needs the ``chem`` extra: RDKit and fcd_torch, imported only when used).
* ``text``: unigram entropy of token samples (MDLM/ReMDM's repetition check) and the perplexity
  bound exp(NELBO per token).
* ``elbo``: LLaDA's Monte-Carlo ELBO of a continuation given a prefix (conditional likelihood).
* ``prompted_model``: generation and likelihood of a loaded model from one set of options;
  ``prompted_tasks`` scores JSON-lines items with it (exact match, choice accuracy), and
  ``lm_eval_adapter`` registers it in lm-evaluation-harness as the model ``prosec`` (imports lm-eval:
  import that module explicitly).
"""
from prosec_mcore.evaluation.molecules import (
    CanonicalSmilesSet,
    FCDScorer,
    MoleculeMetrics,
    canonical_smiles,
    canonical_training_set,
    evaluate_molecules,
    frechet_distance,
    parse_molecule,
)
from prosec_mcore.evaluation.text import perplexity_bound, sample_unigram_entropy, unigram_entropy

__all__ = [
    "CanonicalSmilesSet",
    "FCDScorer",
    "MoleculeMetrics",
    "canonical_smiles",
    "canonical_training_set",
    "evaluate_molecules",
    "frechet_distance",
    "parse_molecule",
    "perplexity_bound",
    "sample_unigram_entropy",
    "unigram_entropy",
]
