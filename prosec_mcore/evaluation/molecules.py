"""How good are generated molecules? Validity, uniqueness, novelty, QED, rings and FCD.

A diffusion LM trained on SMILES strings (QM9) samples *strings*; whether a string is a molecule,
and which molecule, is decided by RDKit:

* **valid**: RDKit parses the string (with sanitisation: valences, aromaticity) into a molecule
  with at least one atom. The empty string parses to an empty molecule and counts as invalid.
  A string with several fragments (``C.C``) is valid, as in MOSES.
* **canonical SMILES**: one string per molecule (``Chem.MolToSmiles`` of the parsed molecule), so
  ``CCO`` and ``OCC`` are the same sample. Every comparison below is between canonical SMILES, and
  the training set is canonicalised the same way (RDKit's canonical form can change between RDKit
  releases, so a cached canonical training set is keyed by the RDKit version too).
* **unique**: distinct canonical SMILES among the valid samples.
* **novel**: unique molecules that are not in the training set.

Counts and fractions are both reported, with their denominators spelled out:
validity = valid / samples, uniqueness = unique / valid, novelty = novel / unique (as MOSES), and
``novel_per_sample`` = novel / samples (what "number of novel molecules out of N samples" reports).

Property means describe what the sampler produces: QED (drug-likeness in [0, 1],
``rdkit.Chem.QED.qed``) and the ring count (``CalcNumRings``, SSSR rings) are averaged over all
valid samples, duplicates included (the sampled distribution), and over the novel molecules
(each counted once).

**FCD** (Frechet ChemNet Distance, Preuer et al. 2018) compares two *sets*: each molecule is
embedded by ChemNet (a network trained to predict biological activities; its penultimate layer,
512 features), each set is summarised by the mean mu and covariance S of its embeddings, and
the distance is the Frechet distance between the two Gaussians:
``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))`` (0 for identical sets). ChemNet's
weights ship inside the ``fcd_torch`` package, so this works offline. The generated side uses the
valid samples (duplicates included); at least two are needed for a covariance, otherwise the
value is NaN and ``fcd_note`` says why. FCD is biased upwards for small sets: compare values
computed from the same number of samples only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np

INSTALL_HINT = "`pip install -e '.[chem]'` (scripts/setup_env.sh installs it)"


@functools.lru_cache(maxsize=None)
def _chem():
    """RDKit's Chem module, with its parse-error log silenced (invalid samples are expected)."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError as err:
        raise ImportError(f"molecule metrics need RDKit: {INSTALL_HINT}") from err
    RDLogger.DisableLog("rdApp.*")
    return Chem


def parse_molecule(smiles: str):
    """The RDKit molecule of a SMILES string, or None if it is not a valid molecule."""
    if not smiles:
        return None
    mol = _chem().MolFromSmiles(smiles)
    return mol if mol is not None and mol.GetNumAtoms() > 0 else None


def canonical_smiles(smiles: str) -> Optional[str]:
    """RDKit's canonical SMILES of a string, or None if it is not a valid molecule."""
    mol = parse_molecule(smiles)
    return None if mol is None else _chem().MolToSmiles(mol)


class CanonicalSmilesSet(frozenset):
    """A set of canonical SMILES (what :func:`canonical_training_set` returns); passing one to
    :func:`evaluate_molecules` skips canonicalising the training set again."""


def _rdkit_version() -> str:
    import rdkit

    return rdkit.__version__


def canonical_training_set(smiles: Iterable[str], cache_dir: Optional[str] = None) -> CanonicalSmilesSet:
    """Canonicalise a training set once (invalid entries dropped).

    With ``cache_dir`` the result is stored in ``cache_dir/canonical_smiles_<key>.txt``, the key
    being a hash of the input list (order included) and the RDKit version; a later call with the
    same list reads the file instead of parsing every molecule again (QM9's 130,831 molecules:
    ~45 s on one busy core, 0.2 s from the cache).
    """
    smiles = list(smiles)
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(f"rdkit {_rdkit_version()}\n".encode())
        for s in smiles:
            digest.update(s.encode())
            digest.update(b"\n")
        path = os.path.join(cache_dir, f"canonical_smiles_{digest.hexdigest()[:24]}.txt")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return CanonicalSmilesSet(line.rstrip("\n") for line in f if line.strip())
    result = CanonicalSmilesSet(c for c in map(canonical_smiles, smiles) if c is not None)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(s + "\n" for s in sorted(result))
        os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
    return result


def _one_blas_thread():
    """Limit numpy's BLAS to one thread (threadpoolctl, part of the ``chem`` extra): 512 x 512
    eigen-decompositions gain nothing from threads, and on cores shared with other jobs the BLAS
    threads' spin-waiting can turn milliseconds into seconds."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``Tr((S1 S2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
    symmetric matrix ``S1^(1/2) S2 S1^(1/2)``, which has the same eigenvalues as ``S1 S2``; both
    eigen-decompositions are symmetric (``eigh``), so singular covariances (fewer molecules than
    features) are no problem. Tiny negative eigenvalues from rounding are clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    with _one_blas_thread():
        w, v = np.linalg.eigh((s1 + s1.T) / 2)
        sqrt_s1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        middle = sqrt_s1 @ s2 @ sqrt_s1
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class TooFewMolecules(ValueError):
    """A set has fewer than the 2 molecules a covariance needs."""


class FCDScorer:
    """ChemNet from ``fcd_torch`` (loaded once), turning SMILES sets into FCD statistics."""

    def __init__(self, device: str = "cpu", batch_size: int = 256, num_threads: Optional[int] = None):
        """``num_threads``: torch CPU threads while ChemNet runs (restored afterwards); 1 avoids
        the slowdown of thread over-subscription when evaluation shares cores with training."""
        try:
            from fcd_torch import FCD
        except ImportError as err:
            raise ImportError(f"FCD needs fcd_torch: {INSTALL_HINT}") from err
        _chem()
        self.device, self.batch_size, self.num_threads = device, batch_size, num_threads
        self.model = FCD(device=device, n_jobs=1, batch_size=batch_size).model.eval()

    def activations(self, smiles: Sequence[str]) -> np.ndarray:
        """ChemNet's 512 penultimate-layer features per molecule, shape [len(smiles), 512]."""
        import torch
        from fcd_torch.utils import SmilesDataset

        data = SmilesDataset(list(smiles), canonize=True)  # fcd_torch's one-hot encoding
        out = []
        self.model.to(self.device)
        threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            with torch.no_grad():
                for start in range(0, len(data), self.batch_size):
                    batch = np.stack([data[i] for i in range(start, min(start + self.batch_size, len(data)))])
                    x = torch.from_numpy(batch).float().transpose(1, 2).to(self.device)
                    out.append(self.model(x).cpu().double().numpy())
        finally:
            torch.set_num_threads(threads)
        return np.concatenate(out) if out else np.zeros((0, 512))

    def statistics(self, smiles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance) of the ChemNet features of at least 2 valid SMILES."""
        if len(smiles) < 2:
            raise TooFewMolecules(f"FCD statistics need at least 2 molecules, got {len(smiles)}")
        acts = self.activations(smiles)
        with _one_blas_thread():
            return acts.mean(axis=0), np.cov(acts, rowvar=False)

    def reference_statistics(self, smiles: Sequence[str], cache_dir: Optional[str] = None):
        """:meth:`statistics` of the valid reference molecules, cached in ``cache_dir`` (an
        ``.npz`` keyed by a hash of the list) since a reference set is scored many times."""
        valid = [c for c in map(canonical_smiles, smiles) if c is not None]
        if cache_dir is None:
            return self.statistics(valid)
        key = hashlib.sha256("\n".join([_rdkit_version(), *valid]).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir, f"fcd_reference_{key}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                return f["mu"], f["sigma"]
        mu, sigma = self.statistics(valid)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma)
        os.replace(tmp, path)
        return mu, sigma


@dataclasses.dataclass
class MoleculeMetrics:
    """Metrics of one set of generated SMILES (see the module docstring for the definitions)."""

    num_samples: int
    num_valid: int
    num_unique: int
    num_novel: int
    validity: float  # num_valid / num_samples
    uniqueness: float  # num_unique / num_valid
    novelty: float  # num_novel / num_unique
    novel_per_sample: float  # num_novel / num_samples
    qed_mean: float  # over valid samples, duplicates included
    rings_mean: float  # over valid samples, duplicates included
    qed_mean_novel: float  # over novel molecules, each once
    rings_mean_novel: float  # over novel molecules, each once
    fcd: float = math.nan
    fcd_note: str = ""  # why fcd is NaN, if it is

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else math.nan


Reference = Union[Sequence[str], tuple[np.ndarray, np.ndarray]]


def evaluate_molecules(samples: Sequence[str], training_set: Iterable[str], reference: Optional[Reference] = None,
                       fcd_scorer: Optional[FCDScorer] = None, min_fcd_molecules: int = 2) -> MoleculeMetrics:
    """All metrics of ``samples`` (generated SMILES strings).

    ``training_set``: SMILES of the training molecules, canonicalised here unless it is a
    :class:`CanonicalSmilesSet` already. ``reference``: SMILES (or precomputed
    ``FCDScorer.reference_statistics``) to compute FCD against; without one FCD is NaN.
    ``fcd_scorer``: reuse a loaded ChemNet (one is created when needed).
    """
    chem = _chem()
    from rdkit.Chem import QED, rdMolDescriptors

    if not isinstance(training_set, CanonicalSmilesSet):
        training_set = canonical_training_set(training_set)
    valid_canonical, qeds, rings, props = [], [], [], {}
    for s in samples:
        mol = parse_molecule(s)
        if mol is None:
            continue
        can = chem.MolToSmiles(mol)
        valid_canonical.append(can)
        if can not in props:
            props[can] = (QED.qed(mol), rdMolDescriptors.CalcNumRings(mol))
        qeds.append(props[can][0])
        rings.append(props[can][1])
    unique = list(dict.fromkeys(valid_canonical))  # first-seen order
    novel = [c for c in unique if c not in training_set]
    n, nv = len(samples), len(valid_canonical)
    metrics = MoleculeMetrics(
        num_samples=n, num_valid=nv, num_unique=len(unique), num_novel=len(novel),
        validity=_ratio(nv, n), uniqueness=_ratio(len(unique), nv), novelty=_ratio(len(novel), len(unique)),
        novel_per_sample=_ratio(len(novel), n),
        qed_mean=_mean(qeds), rings_mean=_mean(rings),
        qed_mean_novel=_mean([props[c][0] for c in novel]), rings_mean_novel=_mean([props[c][1] for c in novel]))
    if reference is None:
        metrics.fcd_note = "no reference set given"
    elif nv < max(2, min_fcd_molecules):
        metrics.fcd_note = f"too few valid molecules for FCD: {nv} < {max(2, min_fcd_molecules)}"
    else:
        scorer = fcd_scorer or FCDScorer()
        precomputed = isinstance(reference, tuple) and len(reference) == 2 and isinstance(reference[0], np.ndarray)
        try:
            ref_stats = reference if precomputed else scorer.reference_statistics(reference)
        except TooFewMolecules as err:
            metrics.fcd_note = f"reference set: {err}"
        else:
            metrics.fcd = frechet_distance(*scorer.statistics(valid_canonical), *ref_stats)
    return metrics
