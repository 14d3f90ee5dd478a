"""The AnnData boundary checks: each problem becomes one StateError naming slot, expectation and fix."""

from __future__ import annotations

import logging

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers.synthetic import make_perturbation_adata
from state.io import anndata_checks as checks
from state.utils.errors import StateError


@pytest.fixture
def adata():
    return make_perturbation_adata(n_cells=60, n_genes=20, n_perts=3)


def test_read_h5ad_checked_reads_and_reports_bad_paths(tmp_path, adata):
    adata.write_h5ad(tmp_path / "ok.h5ad")
    assert checks.read_h5ad_checked(tmp_path / "ok.h5ad").shape == (60, 20)
    backed = checks.read_h5ad_checked(tmp_path / "ok.h5ad", backed="r")
    assert backed.isbacked
    backed.file.close()

    with pytest.raises(StateError, match="does not exist"):
        checks.read_h5ad_checked(tmp_path / "missing.h5ad")
    with pytest.raises(StateError, match="is a directory"):
        checks.read_h5ad_checked(tmp_path)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    with pytest.raises(StateError, match="not HDF5"):
        checks.read_h5ad_checked(tmp_path / "table.csv")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["junk"] = np.arange(3)
    with pytest.raises(StateError, match="could not be read as AnnData"):
        checks.read_h5ad_checked(tmp_path / "plain.h5")


def test_require_obs_columns_lists_available(adata):
    checks.require_obs_columns(adata, ["gene", "cell_type"])
    with pytest.raises(StateError) as err:
        checks.require_obs_columns(adata, ["gene", "drug"], path="x.h5ad", hint="use --pert_col")
    message = str(err.value)
    assert "'drug'" in message and "x.h5ad" in message and "'gem_group'" in message and "--pert_col" in message


def test_require_categorical_converts_or_refuses(adata, caplog):
    adata.obs["plain"] = adata.obs["gene"].astype(str)
    with pytest.raises(StateError, match="must be categorical.*astype\\('category'\\)"):
        checks.require_categorical(adata, "plain", convert=False)
    with caplog.at_level(logging.INFO, logger="state"):
        checks.require_categorical(adata, "plain")
    assert isinstance(adata.obs["plain"].dtype, pd.CategoricalDtype)
    assert "converting it to categorical" in caplog.text
    checks.require_categorical(adata, "gene", convert=False)  # already categorical: no error


def test_require_csr_formats():
    csr = sp.random(5, 4, density=0.5, format="csr", random_state=0)
    assert checks.require_csr(csr) is csr
    dense = csr.toarray()
    assert checks.require_csr(dense) is dense
    with pytest.raises(StateError, match="found ndarray"):
        checks.require_csr(dense, allow_dense=False)
    for fmt in ("csc", "coo"):
        other = csr.asformat(fmt)
        with pytest.raises(StateError, match=f"found {fmt.upper()}.*scipy.sparse.csr_matrix"):
            checks.require_csr(other, slot="obsm['X_hvg']")
        converted = checks.require_csr(other, convert=True)
        assert converted.format == "csr"
        np.testing.assert_array_equal(converted.toarray(), dense)


def test_gene_names_sources(adata):
    adata.var["gene_name"] = [f"sym{i}" for i in range(adata.n_vars)]
    adata.var["ensembl"] = [f"ENSG{i:05d}" for i in range(adata.n_vars)]
    assert checks.gene_names(adata)[0] == "sym0"
    assert checks.gene_names(adata, "ensembl")[1] == "ENSG00001"
    del adata.var["gene_name"]
    np.testing.assert_array_equal(checks.gene_names(adata), adata.var_names.to_numpy())
    with pytest.raises(StateError, match="'symbol' not found in adata.var"):
        checks.gene_names(adata, "symbol")


def test_value_checks_on_sparse_without_densifying():
    # 10^6 x 10^6 would need terabytes if densified; only the stored entries are scanned.
    huge = sp.csr_matrix((np.array([1.0, 2.5, 3.0], dtype=np.float32), ([0, 5, 999_999], [1, 7, 999_999])),
                         shape=(1_000_000, 1_000_000))
    summary = checks.check_nonnegative_counts(huge)
    assert summary.has_fractional and summary.max_value == 3.0 and summary.n_negative == 0

    bad = huge.copy()
    bad.data[:] = [np.nan, -1.0, np.inf]
    s = checks.summarize_values(bad)
    assert (s.n_nan, s.n_inf, s.n_negative) == (1, 1, 1)
    with pytest.raises(StateError, match="adata.X of f.h5ad contains 1 NaN and 1 infinite values"):
        checks.check_finite(bad, path="f.h5ad")
    bad.data[:] = [1.0, -1.0, 2.0]
    checks.check_finite(bad)
    with pytest.raises(StateError, match="1 negative values"):
        checks.check_nonnegative_counts(bad)


def test_value_checks_on_dense_and_integer_matrices():
    ints = np.array([[0, 3], [2, 7]], dtype=np.int64)
    s = checks.check_nonnegative_counts(ints)
    assert not s.has_fractional and s.max_value == 7
    with pytest.raises(StateError, match="3 negative"):
        checks.check_nonnegative_counts(-ints)
    with pytest.raises(StateError, match="1 NaN values"):
        checks.check_finite(np.array([[1.0, np.nan]]), slot="layers['counts']")


def test_require_label_present(adata):
    mask = checks.require_label_present(adata, "gene", "non-targeting")
    assert mask.dtype == bool and mask.sum() == (adata.obs["gene"] == "non-targeting").sum() > 0
    with pytest.raises(StateError) as err:
        checks.require_label_present(adata, "gene", "DMSO", path="p.h5ad")
    assert "'DMSO'" in str(err.value) and "'non-targeting'" in str(err.value) and "p.h5ad" in str(err.value)


def test_check_output_path(tmp_path):
    src = tmp_path / "in.h5ad"
    src.write_bytes(b"x")
    assert checks.check_output_path(src, tmp_path / "new" / "deeper" / "out.h5ad").name == "out.h5ad"
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    with pytest.raises(StateError, match="is the input file"):
        checks.check_output_path(src, tmp_path / "." / "in.h5ad")
    (tmp_path / "link.h5ad").symlink_to(src)
    with pytest.raises(StateError, match="is the input file"):
        checks.check_output_path(src, tmp_path / "link.h5ad")
    with pytest.raises(StateError, match="is a directory"):
        checks.check_output_path(src, tmp_path)
    with pytest.raises(StateError, match="is a file, not a folder"):
        checks.check_output_path(src, src / "sub" / "out.h5ad")


def test_check_output_path_unwritable_folder(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StateError, match="not writable"):
            checks.check_output_path(tmp_path / "in.h5ad", locked / "out.h5ad")
    finally:
        locked.chmod(0o700)


def test_messages_are_one_line(adata):
    with pytest.raises(StateError) as err:
        checks.require_obs_columns(ad.AnnData(np.zeros((2, 2))), ["gene"])
    assert "\n" not in err.value.one_line() and "none" in err.value.one_line()
