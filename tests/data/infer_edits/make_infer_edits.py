"""Regenerate the `state tx infer` input-edit fixtures from arc-state 0.11.1 runs.

Usage (arc-state installed in its own venv, see ../shared/ARC_STATE.md beside the repository):

    python tests/data/infer_edits/make_infer_edits.py --arc <arc-state venv>/bin/state

Every case runs arc-state's ``tx infer`` on the tx/state_llama fixture run with an input derived
from ``tests/data/fixtures/tx/state_llama/infer_input.h5ad`` (see ``derive_input``; the tests
derive the same input) and freezes what the output holds into ``<case>.npz``:
obs names, the obs columns as str, the predicted ``obsm['X_hvg']``, a digest of X, and the
slot names that survive (uns, layers, obsm).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np

HERE = Path(__file__).resolve().parent
FIX = HERE.parent / "fixtures" / "tx" / "state_llama"

# requests of the --tsv cases: a new perturbation, an existing one, a zero row and control clones
TSV_TEXT = "perturbation\tnum_cells\nTXG0106\t5\nTXG0023\t3\nTXG0122\t0\nnon-targeting\t2\n"

# case name -> (input variant, extra arguments); counts are chosen so that no two perturbations
# short of --min-cells tie in value_counts() (tie order depends on the CPU's numpy sort)
CASES = {
    "tsv_only": ("full", ["--tsv", "{tsv}"]),
    "combined": ("full", ["--tsv", "{tsv}", "--all-perts", "--virtual-cells-per-pert", "8", "--min-cells", "7",
                          "--max-cells", "15"]),
    "min_max": ("full", ["--min-cells", "14", "--max-cells", "21"]),
    "all_perts_min": ("full", ["--all-perts", "--virtual-cells-per-pert", "16", "--min-cells", "13"]),
    "global_fallback": ("no_ctA_controls", ["--max-cells", "18"]),
}


def derive_input(variant: str) -> ad.AnnData:
    """The input of a case (``full``: the fixture input; ``no_ctA_controls``: ctA without controls)."""
    adata = ad.read_h5ad(FIX / "infer_input.h5ad")
    if variant == "no_ctA_controls":
        keep = ~((adata.obs["cell_type"] == "ctA") & (adata.obs["gene"] == "non-targeting")).to_numpy()
        adata = adata[keep].copy()
    return adata


def freeze(path: Path) -> dict[str, np.ndarray]:
    out = ad.read_h5ad(path)
    x = np.ascontiguousarray(out.X.toarray() if hasattr(out.X, "toarray") else out.X)
    return {
        "obs_names": np.asarray(out.obs_names, dtype=str),
        **{f"obs_{c}": out.obs[c].astype(str).to_numpy().astype(str) for c in out.obs.columns},
        "X_hvg": np.asarray(out.obsm["X_hvg"], dtype=np.float32),
        "x_sha256": np.asarray(hashlib.sha256(x.astype(np.float32).tobytes()).hexdigest()),
        "x_shape": np.asarray(x.shape),
        "uns_keys": np.asarray(sorted(out.uns.keys()), dtype=str),
        "layers_keys": np.asarray(sorted(out.layers.keys()), dtype=str),
        "obsm_keys": np.asarray(sorted(out.obsm.keys()), dtype=str),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arc", default=os.environ.get("ARC_STATE", "/root/arc/bin/state"), help="arc-state 0.11.1's `state` executable")
    parser.add_argument("cases", nargs="*", help="cases to regenerate (default: all)")
    args = parser.parse_args()
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tsv = tmp / "requests.tsv"
        tsv.write_text(TSV_TEXT)
        for name, (variant, extra) in CASES.items():
            if args.cases and name not in args.cases:
                continue
            source = tmp / f"{variant}.h5ad"
            if not source.exists():
                derive_input(variant).write_h5ad(source)
            out = tmp / f"{name}_out.h5ad"
            cmd = [args.arc, "tx", "infer", "--model-dir", str(FIX / "run"), "--adata", str(source),
                   "--pert-col", "gene", "--embed-key", "X_hvg", "--output", str(out), "--seed", "42", "--quiet",
                   *[a.format(tsv=tsv) for a in extra]]
            subprocess.run(cmd, check=True, env=env)
            np.savez_compressed(HERE / f"{name}.npz", **freeze(out))
            print(f"{name}: {' '.join(extra).format(tsv='requests.tsv')}")


if __name__ == "__main__":
    main()
