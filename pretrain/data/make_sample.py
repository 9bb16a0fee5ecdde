"""Regenerate the built-in sample corpus in pretrain/data/sample/ (run by hand, not at install time).

    python -m pretrain.data.make_sample        # needs rdkit in the environment (generator only)

docstrings.jsonl.gz  public docstrings of installed scientific packages (numpy, scipy, sympy,
                     matplotlib, torch): real prose with LaTeX, equations and numpydoc references
molecules.jsonl.gz   well-known molecules with their SMILES; each checked with RDKit against its
                     molecular formula, and chiral ones against their CIP labels (R/S, E/Z), so
                     the isomeric SMILES are right; properties are RDKit-computed
No protein or DNA records: no real sequence data is available offline from installed packages.
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import json
from pathlib import Path

OUT = Path(__file__).parent / "sample"
MODULES = [
    "numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.polynomial.polynomial",
    "scipy.stats", "scipy.special", "scipy.linalg", "scipy.optimize", "scipy.integrate", "scipy.spatial",
    "scipy.constants", "sympy", "sympy.stats", "matplotlib.pyplot",
    "torch", "torch.nn", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.special",
]
MAX_DOCS_PER_MODULE = 250  # the first ones in alphabetical order
MIN_DOC_CHARS, MAX_DOC_CHARS = 300, 2_500  # long docstrings are cut (at a line break)

# name, SMILES, molecular formula, expected stereo labels (CIP R/S of atoms, E/Z of double bonds, sorted)
MOLECULES = [
    ("water", "O", "H2O", ""), ("methane", "C", "CH4", ""), ("ammonia", "N", "H3N", ""),
    ("carbon dioxide", "O=C=O", "CO2", ""), ("formaldehyde", "C=O", "CH2O", ""),
    ("methanol", "CO", "CH4O", ""), ("ethanol", "CCO", "C2H6O", ""), ("acetic acid", "CC(=O)O", "C2H4O2", ""),
    ("acetone", "CC(C)=O", "C3H6O", ""), ("ethylene", "C=C", "C2H4", ""), ("acetylene", "C#C", "C2H2", ""),
    ("urea", "NC(N)=O", "CH4N2O", ""), ("glycerol", "OCC(O)CO", "C3H8O3", ""),
    ("acetonitrile", "CC#N", "C2H3N", ""), ("dimethyl sulfoxide", "CS(C)=O", "C2H6OS", ""),
    ("chloroform", "ClC(Cl)Cl", "CHCl3", ""), ("dichloromethane", "ClCCl", "CH2Cl2", ""),
    ("tetrahydrofuran", "C1CCOC1", "C4H8O", ""), ("diethyl ether", "CCOCC", "C4H10O", ""),
    ("ethyl acetate", "CCOC(C)=O", "C4H8O2", ""), ("cyclohexane", "C1CCCCC1", "C6H12", ""),
    ("benzene", "c1ccccc1", "C6H6", ""), ("toluene", "Cc1ccccc1", "C7H8", ""), ("phenol", "Oc1ccccc1", "C6H6O", ""),
    ("aniline", "Nc1ccccc1", "C6H7N", ""), ("styrene", "C=Cc1ccccc1", "C8H8", ""),
    ("benzoic acid", "OC(=O)c1ccccc1", "C7H6O2", ""), ("salicylic acid", "OC(=O)c1ccccc1O", "C7H6O3", ""),
    ("nitrobenzene", "O=[N+]([O-])c1ccccc1", "C6H5NO2", ""),
    ("2,4,6-trinitrotoluene", "Cc1c(cc(cc1[N+](=O)[O-])[N+](=O)[O-])[N+](=O)[O-]", "C7H5N3O6", ""),
    ("naphthalene", "c1ccc2ccccc2c1", "C10H8", ""), ("pyridine", "c1ccncc1", "C5H5N", ""),
    ("pyrrole", "c1cc[nH]c1", "C4H5N", ""), ("furan", "c1ccoc1", "C4H4O", ""), ("thiophene", "c1ccsc1", "C4H4S", ""),
    ("imidazole", "c1cnc[nH]1", "C3H4N2", ""), ("pyrimidine", "c1cncnc1", "C4H4N2", ""),
    ("indole", "c1ccc2[nH]ccc2c1", "C8H7N", ""),
    ("adenine", "Nc1ncnc2[nH]cnc12", "C5H5N5", ""), ("guanine", "Nc1nc2[nH]cnc2c(=O)[nH]1", "C5H5N5O", ""),
    ("cytosine", "Nc1cc[nH]c(=O)n1", "C4H5N3O", ""), ("thymine", "Cc1c[nH]c(=O)[nH]c1=O", "C5H6N2O2", ""),
    ("uracil", "O=c1cc[nH]c(=O)[nH]1", "C4H4N2O2", ""),
    ("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "C8H10N4O2", ""),
    ("theobromine", "Cn1cnc2c1c(=O)[nH]c(=O)n2C", "C7H8N4O2", ""),
    ("aspirin", "CC(=O)Oc1ccccc1C(=O)O", "C9H8O4", ""), ("paracetamol", "CC(=O)Nc1ccc(O)cc1", "C8H9NO2", ""),
    ("ibuprofen", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "C13H18O2", ""),
    ("metformin", "CN(C)C(=N)N=C(N)N", "C4H11N5", ""),
    ("lidocaine", "CCN(CC)CC(=O)Nc1c(C)cccc1C", "C14H22N2O", ""),
    ("diazepam", "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21", "C16H13ClN2O", ""),
    ("nicotinamide", "NC(=O)c1cccnc1", "C6H6N2O", ""), ("histamine", "NCCc1cnc[nH]1", "C5H9N3", ""),
    ("dopamine", "NCCc1ccc(O)c(O)c1", "C8H11NO2", ""), ("serotonin", "NCCc1c[nH]c2ccc(O)cc12", "C10H12N2O", ""),
    ("vanillin", "COc1cc(C=O)ccc1O", "C8H8O3", ""), ("citric acid", "OC(=O)CC(O)(CC(=O)O)C(=O)O", "C6H8O7", ""),
    ("glycine", "NCC(=O)O", "C2H5NO2", ""),
    # isomeric SMILES: chirality and double-bond geometry, checked against the expected labels
    ("L-alanine", "C[C@H](N)C(=O)O", "C3H7NO2", "S"), ("L-serine", "N[C@@H](CO)C(=O)O", "C3H7NO3", "S"),
    ("L-cysteine", "N[C@@H](CS)C(=O)O", "C3H7NO2S", "R"), ("L-valine", "CC(C)[C@H](N)C(=O)O", "C5H11NO2", "S"),
    ("L-leucine", "CC(C)C[C@H](N)C(=O)O", "C6H13NO2", "S"), ("L-proline", "OC(=O)[C@@H]1CCCN1", "C5H9NO2", "S"),
    ("L-phenylalanine", "N[C@@H](Cc1ccccc1)C(=O)O", "C9H11NO2", "S"),
    ("L-threonine", "C[C@@H](O)[C@H](N)C(=O)O", "C4H9NO3", "RS"),
    ("L-lactic acid", "C[C@H](O)C(=O)O", "C3H6O3", "S"), ("D-glyceraldehyde", "OC[C@@H](O)C=O", "C3H6O3", "R"),
    ("(S)-ibuprofen", "CC(C)Cc1ccc(cc1)[C@H](C)C(=O)O", "C13H18O2", "S"),
    ("(S)-naproxen", "COc1ccc2cc(ccc2c1)[C@H](C)C(=O)O", "C14H14O3", "S"),
    ("(S)-nicotine", "CN1CCC[C@H]1c1cccnc1", "C10H14N2", "S"),
    ("(R)-adrenaline", "CNC[C@H](O)c1ccc(O)c(O)c1", "C9H13NO3", "R"),
    ("(R)-carvone", "CC(=C)[C@@H]1CC=C(C)C(=O)C1", "C10H14O", "R"),
    ("L-ascorbic acid", "OC[C@H](O)[C@H]1OC(=O)C(O)=C1O", "C6H8O6", "RS"),
    ("(E)-but-2-ene", "C/C=C/C", "C4H8", "E"), ("(Z)-but-2-ene", "C/C=C\\C", "C4H8", "Z"),
    ("fumaric acid", "OC(=O)/C=C/C(=O)O", "C4H4O4", "E"), ("maleic acid", "OC(=O)/C=C\\C(=O)O", "C4H4O4", "Z"),
    ("trans-cinnamic acid", "OC(=O)/C=C/c1ccccc1", "C9H8O2", "E"),
    ("(E)-stilbene", "c1ccc(cc1)/C=C/c1ccccc1", "C14H12", "E"),
    ("oleic acid", "CCCCCCCC/C=C\\CCCCCCCC(=O)O", "C18H34O2", "Z"),
    ("elaidic acid", "CCCCCCCC/C=C/CCCCCCCC(=O)O", "C18H34O2", "E"),
    ("capsaicin", "COc1cc(CNC(=O)CCCC/C=C/C(C)C)ccc1O", "C18H27NO3", "E"),
]


def docstrings() -> list[dict]:
    seen: set[int] = set()
    docs = []
    for modname in MODULES:
        module = importlib.import_module(modname)
        taken = 0
        for name in sorted(getattr(module, "__all__", None) or dir(module)):
            if name.startswith("_"):
                continue
            obj = getattr(module, name, None)
            if obj is None or id(obj) in seen or inspect.ismodule(obj):
                continue
            doc = inspect.getdoc(obj)
            if not doc or len(doc) < MIN_DOC_CHARS or doc == inspect.getdoc(type(obj)):
                continue
            seen.add(id(obj))
            taken += 1
            if taken > MAX_DOCS_PER_MODULE:
                break
            docs.append({"id": f"doc:{modname}.{name}", "source": "docstrings", "title": f"{modname}.{name}",
                         "text": _cut(doc), "package": modname.split(".")[0]})
    return docs


def _cut(doc: str) -> str:
    if len(doc) <= MAX_DOC_CHARS:
        return doc
    cut = doc.rfind("\n", 0, MAX_DOC_CHARS)
    return doc[:cut if cut > MAX_DOC_CHARS // 2 else MAX_DOC_CHARS].rstrip()


def molecules() -> list[dict]:
    from rdkit import Chem, RDLogger
    from rdkit.Chem import Descriptors, rdMolDescriptors
    RDLogger.DisableLog("rdApp.*")
    docs = []
    for i, (name, smiles, formula, stereo) in enumerate(MOLECULES):
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise ValueError(f"{name}: RDKit cannot parse {smiles}")
        got = rdMolDescriptors.CalcMolFormula(mol)
        if got != formula:
            raise ValueError(f"{name}: {smiles} is {got}, expected {formula}")
        Chem.AssignStereochemistry(mol, cleanIt=True, force=True)
        labels = [label for _, label in Chem.FindMolChiralCenters(mol)]
        labels += ["E" if b.GetStereo() == Chem.BondStereo.STEREOE else "Z" for b in mol.GetBonds()
                   if b.GetStereo() in (Chem.BondStereo.STEREOE, Chem.BondStereo.STEREOZ)]
        if "".join(sorted(labels)) != stereo:
            raise ValueError(f"{name}: {smiles} has stereo {sorted(labels)}, expected {stereo!r}")
        docs.append({"id": f"mol:{i}", "source": "molecules", "name": name, "smiles": smiles,
                     "properties": {"molecular formula": formula,
                                    "molecular weight": round(Descriptors.MolWt(mol), 2),
                                    "heavy atoms": mol.GetNumHeavyAtoms(),
                                    "hydrogen bond donors": rdMolDescriptors.CalcNumHBD(mol),
                                    "hydrogen bond acceptors": rdMolDescriptors.CalcNumHBA(mol)}})
    return docs


def write(name: str, records: list[dict]) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n")
    return path


def main() -> None:
    for name, records in (("molecules.jsonl.gz", molecules()), ("docstrings.jsonl.gz", docstrings())):
        path = write(name, records)
        print(f"{path}: {len(records)} records, {path.stat().st_size / 1e6:.2f} MB compressed")


if __name__ == "__main__":
    main()
