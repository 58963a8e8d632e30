"""Molecule metrics against values computed by hand, RDKit called independently, and fcd_torch.

The expected counts below are worked out by hand from the SMILES; QED is compared with RDKit's
``qed`` of the same molecule written differently (so canonicalisation is exercised too); FCD's
formula is checked on Gaussians whose distance is known in closed form, and its ChemNet
statistics against fcd_torch's own ``FCD.precalc``.
"""
import math
import warnings

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule metrics need RDKit: pip install -e '.[chem]' "
                                    "(scripts/setup_env.sh installs it)")
from rdkit import Chem
from rdkit.Chem import QED

from prosec_mcore.evaluation.molecules import (
    CanonicalSmilesSet, FCDScorer, canonical_smiles, canonical_training_set, evaluate_molecules,
    frechet_distance)

SAMPLES = ["CCO", "OCC", "C1CC1", "not_a_smiles", "c1ccccc1", ""]


def qed_of(smiles):
    return QED.qed(Chem.MolFromSmiles(smiles))


def test_counts_fractions_and_properties_by_hand():
    m = evaluate_molecules(SAMPLES, {"CCO"})
    # valid: CCO, OCC (= ethanol again), C1CC1, benzene; "not_a_smiles" and "" are invalid
    assert (m.num_samples, m.num_valid, m.num_unique, m.num_novel) == (6, 4, 3, 2)
    assert m.validity == pytest.approx(4 / 6)
    assert m.uniqueness == pytest.approx(3 / 4)
    assert m.novelty == pytest.approx(2 / 3)  # cyclopropane and benzene, of 3 unique
    assert m.novel_per_sample == pytest.approx(2 / 6)
    # rings per valid sample: 0, 0, 1, 1; novel molecules: 1, 1
    assert m.rings_mean == pytest.approx(0.5)
    assert m.rings_mean_novel == pytest.approx(1.0)
    # QED from other spellings: explicit hydrogens, Kekule benzene
    ethanol, cyclopropane, benzene = qed_of("[CH3][CH2][OH]"), qed_of("[CH2]1[CH2][CH2]1"), qed_of("C1=CC=CC=C1")
    assert len({round(ethanol, 6), round(cyclopropane, 6), round(benzene, 6)}) == 3  # the test can tell them apart
    assert m.qed_mean == pytest.approx((2 * ethanol + cyclopropane + benzene) / 4, abs=1e-12)
    assert m.qed_mean_novel == pytest.approx((cyclopropane + benzene) / 2, abs=1e-12)
    assert math.isnan(m.fcd) and m.fcd_note == "no reference set given"
    d = m.to_dict()
    assert d["num_novel"] == 2 and d["validity"] == pytest.approx(4 / 6) and set(d) >= {"fcd", "fcd_note"}


def test_training_set_is_canonicalised_the_same_way():
    # ethanol and benzene in the training set, spelled differently from the samples
    m = evaluate_molecules(SAMPLES, ["C(C)O", "C1=CC=CC=C1", "also_not_a_smiles"])
    assert m.num_novel == 1 and m.rings_mean_novel == 1.0 and m.qed_mean_novel == pytest.approx(qed_of("C1CC1"))
    assert canonical_training_set(["C(C)O", "OCC", "bad", ""]) == {canonical_smiles("CCO")}


def test_validity_edge_cases():
    assert canonical_smiles("") is None  # RDKit parses "" to a molecule with no atoms
    assert canonical_smiles("C(C") is None and canonical_smiles("c1cc1") is None  # syntax, aromaticity
    assert canonical_smiles("OCC") == canonical_smiles("CCO") == "CCO"
    m = evaluate_molecules(["C.C", "C(C", ""], set())
    assert (m.num_valid, m.num_unique, m.num_novel) == (1, 1, 1)  # two methanes are one valid sample
    nothing = evaluate_molecules(["", "xyz"], set(), reference=["CCO", "CCC"])
    assert nothing.validity == 0.0 and math.isnan(nothing.uniqueness) and math.isnan(nothing.qed_mean)
    assert math.isnan(nothing.fcd) and "too few valid molecules" in nothing.fcd_note


def test_canonical_training_set_cache(tmp_path):
    train = ["OCC", "C1=CC=CC=C1", "bad"]
    first = canonical_training_set(train, cache_dir=str(tmp_path))
    assert isinstance(first, CanonicalSmilesSet) and first == {"CCO", "c1ccccc1"}
    (cache_file,) = tmp_path.iterdir()
    assert cache_file.read_text().split() == ["CCO", "c1ccccc1"]
    # a second call reads the file: prove it by planting a marker in it
    cache_file.write_text("MARKER\n")
    assert canonical_training_set(train, cache_dir=str(tmp_path)) == {"MARKER"}
    # another list (even another order) has another key
    assert canonical_training_set(train[::-1], cache_dir=str(tmp_path)) == first
    assert len(list(tmp_path.iterdir())) == 2


def test_frechet_distance_closed_form():
    # Independent Gaussians: Tr((S1 S2)^1/2) = sum sqrt(s1_i s2_i).
    # |mu1-mu2|^2 = 1, Tr S1 + Tr S2 = 5 + 13, Tr sqrt = 2 + 6  ->  1 + 18 - 16 = 3
    mu1, s1, mu2, s2 = np.array([0.0, 1.0]), np.diag([1.0, 4.0]), np.array([1.0, 1.0]), np.diag([4.0, 9.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(3.0, abs=1e-12)
    # rotating both Gaussians the same way changes nothing (now the covariances are not diagonal)
    c, s = np.cos(0.7), np.sin(0.7)
    q = np.array([[c, -s], [s, c]])
    assert frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T) == pytest.approx(3.0, abs=1e-9)
    # one dimension: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([2.0], [[9.0]], [0.0], [[1.0]]) == pytest.approx(4.0 + 4.0)


SMALL = ["C", "CC", "CCC", "CCO", "CCN", "CC#N", "C1CC1", "OCC=O", "CC(C)O", "C1CO1", "NC=O", "CC(C)=O",
         "C#C", "CCCC", "OCCO", "C1CCC1", "CC(N)=O", "COC", "CN(C)C", "C=CC=O", "OC1CC1", "CC1CN1", "N#CC#N"]
# the same molecules, spelled differently and in reverse order
RESPELLED = ["C(#N)C#N", "N1CC1C", "C1CC1O", "O=CC=C", "C(N(C)C)", "C(OC)", "NC(C)=O", "C1CCC1", "C(O)CO",
             "C(CC)C", "C#C", "O=C(C)C", "O=CN", "O1CC1", "OC(C)C", "O=CCO", "C1CC1", "N#CC", "NCC", "OCC",
             "C(C)C", "C(C)", "[CH4]"]
DRUGS = ["CC(=O)Oc1ccccc1C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
         "CC(=O)Nc1ccc(O)cc1", "Clc1ccc(cc1)C(c1ccccc1)N1CCNCC1", "c1ccc2ccccc2c1", "Brc1ccc(Br)cc1",
         "FC(F)(F)c1ccccc1", "Ic1ccccc1O", "O=C(O)c1ccccc1O", "c1ccc(cc1)c1ccccc1", "CCN(CC)C(=O)c1cccc(C)c1"]


@pytest.fixture(scope="module")
def scorer():
    return FCDScorer(device="cpu", num_threads=1)  # fast also on cores shared with other jobs


def test_fcd_zero_for_same_set_larger_for_different_set(scorer, tmp_path):
    assert sorted(map(canonical_smiles, RESPELLED)) == sorted(map(canonical_smiles, SMALL))
    ref = scorer.reference_statistics(SMALL, cache_dir=str(tmp_path))
    same = evaluate_molecules(SMALL, [], reference=ref, fcd_scorer=scorer).fcd
    respelled = evaluate_molecules(RESPELLED, [], reference=SMALL, fcd_scorer=scorer).fcd
    half = evaluate_molecules(SMALL[:12], [], reference=ref, fcd_scorer=scorer).fcd
    drugs = evaluate_molecules(DRUGS + ["not_a_smiles"], [], reference=ref, fcd_scorer=scorer)
    assert abs(same) < 1e-4 and abs(respelled) < 1e-4
    assert 0.5 < half < drugs.fcd  # a subset of the same kind of molecules is closer than drugs
    assert drugs.fcd > 10.0 and drugs.fcd_note == ""
    # a second call reads the cached file: prove it by planting marker statistics in it
    (cache_file,) = tmp_path.glob("fcd_reference_*.npz")
    np.savez(cache_file, mu=ref[0] + 1.0, sigma=ref[1])
    again = scorer.reference_statistics(SMALL, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(again[0], ref[0] + 1.0)


def test_fcd_statistics_match_fcd_torch(scorer):
    import torch
    from fcd_torch import FCD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fcd_torch 1.0.7 uses numpy's deprecated row_stack
            theirs = FCD(device="cpu", n_jobs=1).precalc(RESPELLED + DRUGS)
    finally:
        torch.set_num_threads(threads)
    mu, sigma = scorer.statistics(RESPELLED + DRUGS)
    np.testing.assert_allclose(mu, theirs["mu"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, theirs["sigma"], rtol=1e-5, atol=1e-7)


def test_fcd_needs_two_reference_molecules(scorer):
    m = evaluate_molecules(SMALL, [], reference=["CCO", "nonsense"], fcd_scorer=scorer)
    assert math.isnan(m.fcd) and m.fcd_note.startswith("reference set:") and "at least 2" in m.fcd_note
