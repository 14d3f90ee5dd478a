"""Glue for ``state tx infer``: load the run and the input, edit, simulate, write the output."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from state.io.atomic import atomic_path, atomic_write_h5ad, ensure_parent_writable
from state.io.columns import ColumnChoices, InputColumns, resolve_columns
from state.io.hvg_names import HVG_NAMES_KEY, HVG_OBSM_KEY, MISSING_WARNING, get_hvg_var_names
from state.tx.infer import counts as infer_counts
from state.tx.infer import edits as infer_edits
from state.tx.infer import full_genes as infer_full
from state.tx.infer.edits import InputEdits
from state.tx.infer.simulate import (
    CLIP_MAX,
    SimulationResult,
    basal_rows,
    feature_reader,
    plan_windows,
    simulate,
)
from state.utils.errors import StateError

log = logging.getLogger(__name__)


def default_output_path(adata_path: str | Path) -> Path:
    """``<input>_simulated.h5ad`` next to the input (arc-state's default)."""
    path = Path(adata_path)
    name = path.name[: -len(".h5ad")] if path.name.endswith(".h5ad") else path.name
    return path.with_name(f"{name}_simulated.h5ad")


def _checked_output(output: str | Path | None, adata_path: str | Path) -> Path:
    output = Path(output) if output is not None else default_output_path(adata_path)
    if output.suffix.lower() not in (".h5ad", ".npy"):
        raise StateError(f"--output {output} must end in .h5ad or .npy")
    if output.resolve() == Path(adata_path).resolve():
        raise StateError(f"--output {output} is the input file", hint="choose a different output path")
    ensure_parent_writable(output)
    return output


def write_predictions(
    adata: ad.AnnData,
    preds: np.ndarray,
    counts: np.ndarray | None,
    *,
    embed_key: str | None,
    output_space: str,
) -> ad.AnnData:
    """Put predictions in the slots arc-state uses: ``.X`` or ``obsm['X_state_pred']`` without an embed
    key; ``obsm[embed_key]`` (or ``<embed_key>_pred`` when widths differ) with one; decoded gene counts in
    ``obsm['X_hvg']`` / ``.X``. Gene-space values are clipped to [0, CLIP_MAX] as arc-state does.

    ``preds`` is clipped in place (it is ours to consume): a clipped copy would add one more
    output-sized array to the peak memory.
    """
    clip = output_space in ("gene", "all")
    latent = np.clip(preds, 0.0, CLIP_MAX, out=preds) if clip else preds
    if embed_key is None:
        if latent.shape[1] == adata.n_vars:
            adata.X = latent.astype(np.float32, copy=False)
        else:
            log.info("prediction width %d != n_vars %d: writing obsm['X_state_pred']", latent.shape[1], adata.n_vars)
            adata.obsm["X_state_pred"] = latent
        return adata
    if adata.obsm[embed_key].shape[1] == latent.shape[1]:
        adata.obsm[embed_key] = latent
    else:
        adata.obsm[f"{embed_key}_pred"] = latent
    store_counts = (embed_key != "X_hvg" and output_space == "gene") or output_space == "all"
    if store_counts and counts is not None:
        decoded = np.clip(counts, 0.0, CLIP_MAX, out=counts).astype(np.float32, copy=False)
        if output_space == "gene":
            adata.obsm["X_hvg"] = decoded
        elif decoded.shape[1] == adata.n_vars:
            adata.X = decoded
        else:
            adata.obsm["X_state_pred"] = decoded
    return adata


def run_infer(
    *,
    model_dir: str | Path,
    adata_path: str | Path,
    output: str | Path | None = None,
    checkpoint: str | Path | None = None,
    columns: ColumnChoices | None = None,
    edits: InputEdits | None = None,
    seed: int = 42,
    max_set_len: int | None = None,
    quiet: bool = False,
    unknown_as_control: bool = False,
    global_control_fallback: bool = False,
    counts_method: str | None = None,
    verbose: bool = False,
    full_genes: bool | str | Path = False,
) -> Path:
    """``state tx infer``: simulate every cell of ``adata_path`` with a run's checkpoint; returns the output path.

    ``columns`` default to the command's (``--pert-col drugname_drugconc``, auto-detected cell
    types, .X features); ``edits`` to none. ``counts_method`` (``--output-counts``) writes integer
    counts instead of log1p values (:mod:`state.tx.infer.counts`). ``full_genes`` (``--full-genes``:
    True, or a gene list file) writes every gene, the unmodelled ones from the basal control cells
    (:mod:`state.tx.infer.full_genes`).
    """
    from state.io.anndata_checks import read_h5ad_checked
    from state.tx.infer.predictor import load_predictor

    edits = edits or InputEdits()
    edits.check()
    output = _checked_output(output, adata_path)
    predictor = load_predictor(model_dir, checkpoint)
    adata = read_h5ad_checked(adata_path)
    roles = resolve_columns(adata, columns or ColumnChoices(), predictor.run_columns, cli=True,
                            source=str(adata_path))
    check_finite_features(adata, roles.embed_key, source=str(adata_path))
    hvg_names, hvg_status = hvg_names_of_input(adata, roles.embed_key, quiet=quiet, verbose=verbose)
    axis = None
    if full_genes:
        axis = infer_full.plan_axis(adata, predictor.genes, None if full_genes is True else full_genes,
                                    output_space=predictor.output_space, output=output, source=str(adata_path))
    counts_plan = None
    if counts_method is not None:  # library sizes come from the input as read (the edits may drop layers)
        counts_plan = infer_counts.plan_counts(adata, roles, method=counts_method, seed=seed,
                                               output_space=predictor.output_space, output=output)
    adata = infer_edits.apply_edits(adata, edits, roles, pert_names=predictor.pert_names, seed=seed)
    if counts_plan is not None:
        counts_plan.groups = infer_counts.cell_groups(adata, roles)
    if hvg_names is not None:  # the concat of --all-perts / --min-cells drops uns; the names stay true
        adata.uns.setdefault(HVG_NAMES_KEY, hvg_names)
    log.info("HVG names: %s", hvg_status)
    roles.require_controls(adata, source=str(adata_path))
    result = simulate_anndata(predictor, adata, roles, seed=seed, max_set_len=max_set_len, quiet=quiet,
                              unknown_as_control=unknown_as_control, global_control_fallback=global_control_fallback)
    if output.suffix.lower() == ".npy":
        main = result.preds  # float32, clipped in place: no output-sized copies
        if predictor.output_space in ("gene", "all"):
            np.clip(main, 0.0, CLIP_MAX, out=main)
        with atomic_path(output) as tmp:
            np.save(tmp, main.astype(np.float32, copy=False))
        return output
    full = None
    if axis is not None:  # before write_predictions clips the prediction in place and replaces X
        genes = predictor.genes or []
        prediction = infer_full.gene_prediction(result, genes, predictor.model_embed_key)
        full = infer_full.full_gene_matrix(adata, axis, prediction, genes, result.basal)
    adata = write_predictions(adata, result.preds, result.counts, embed_key=roles.embed_key,
                              output_space=predictor.output_space)
    if full is not None:
        adata = infer_full.with_full_genes(adata, axis, full)
    if counts_plan is not None:
        in_x = full is not None or infer_counts.prediction_in_x(
            embed_key=roles.embed_key, output_space=predictor.output_space, preds=result.preds,
            counts=result.counts, n_vars=adata.n_vars)
        adata = infer_counts.apply_counts(counts_plan, adata, in_x=in_x)
    atomic_write_h5ad(adata, output)
    return output


def simulate_anndata(
    predictor,
    adata: ad.AnnData,
    columns: InputColumns,
    *,
    seed: int,
    max_set_len: int | None,
    quiet: bool = False,
    unknown_as_control: bool = False,
    global_control_fallback: bool = False,
) -> SimulationResult:
    """Simulate every row of an in-memory AnnData (the core of ``state tx infer`` and ``api``).

    ``columns`` are the input's resolved roles (:func:`state.io.columns.resolve_columns`).
    """
    labels = columns.labels(adata)
    groups = (adata.obs[columns.celltype_col].astype(str).to_numpy() if columns.celltype_col
              else np.full(adata.n_obs, "all", dtype=object))
    batch_index = None
    if predictor.uses_batch:
        batch_index = predictor.batch_indices(adata.obs[columns.batch_col].astype(str).to_numpy())
    if columns.embed_key is None:
        adata = predictor.align_genes(adata)
    read, width = feature_reader(adata, columns.embed_key)
    predictor.check_input_width(width, embed_key=columns.embed_key)
    check_labels(labels, groups, predictor, columns, unknown_as_control=unknown_as_control,
                 global_control_fallback=global_control_fallback)
    set_len = int(max_set_len or predictor.cell_set_len)
    windows, skipped = plan_windows(labels, groups, control=columns.control, set_len=set_len, seed=seed)
    if skipped:
        log.warning("no control cells at all: rows of %s left unchanged", ", ".join(skipped))
    result = simulate(predictor, windows, read, n_cells=adata.n_obs, pert_vectors=predictor.pert_vector,
                      batch_index=batch_index, cell_types=groups, quiet=quiet)
    result.preds = keep_unpredicted(result.preds, result.done, adata, columns.embed_key)
    result.basal = basal_rows(windows, adata.n_obs)
    return result


def hvg_names_of_input(adata: ad.AnnData, embed_key: str | None, *, quiet: bool, verbose: bool):
    """The input's ``uns['X_hvg_var_names']`` (to carry into the output) and present / missing / n/a;
    only ``--embed-key X_hvg`` inputs are looked at (arc-state PR #246)."""
    if embed_key != HVG_OBSM_KEY:
        return None, "n/a"
    names = get_hvg_var_names(adata)
    if names is None and not quiet:
        log.warning(MISSING_WARNING)
    if verbose and not quiet:
        log.info(f"HVG gene names found for X_hvg: {len(names)} entries." if names is not None
                 else "HVG gene names not found for X_hvg.")
    return adata.uns.get(HVG_NAMES_KEY), "present" if names is not None else "missing"


def check_finite_features(adata: ad.AnnData, embed_key: str | None, *, source: str) -> None:
    """Refuse NaN / inf features: the model would turn them into NaN predictions without a word."""
    matrix = adata.X if embed_key is None else adata.obsm[embed_key]
    if matrix is None:
        return
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    bad_rows = 0
    for start in range(0, values.shape[0], 65536):  # in slices: no input-sized boolean copy
        chunk = values[start : start + 65536]
        finite = np.isfinite(chunk)
        bad_rows += int((~finite).sum()) if sp.issparse(matrix) else int((~finite.all(axis=-1)).sum())
    if bad_rows:
        slot = "X" if embed_key is None else f"obsm['{embed_key}']"
        unit = "value(s)" if sp.issparse(matrix) else "cell(s)"
        raise StateError(f"{source}: {slot} holds NaN or infinite values in {bad_rows} {unit}",
                         hint="fix or drop those cells before inferring (predictions would be NaN)")


def check_labels(labels: np.ndarray, groups: np.ndarray, predictor, columns: InputColumns, *,
                 unknown_as_control: bool, global_control_fallback: bool = False) -> None:
    """Refuse inputs that would silently give meaningless predictions (both are user decisions)."""
    control = columns.control
    unknown = sorted(set(pd.unique(labels)) - set(predictor.pert_names) - {control})
    if getattr(predictor, "combinations", None) is not None:
        from state.tx.combinations import refuse_unknown_parts

        unknown = refuse_unknown_parts(unknown, predictor, unknown_as_control=unknown_as_control)
    if unknown and not unknown_as_control:
        flag = columns.flag("unknown_as_control") + ("" if columns.cli else "=True")
        raise StateError(
            f"{len(unknown)} perturbation(s) in the input are unknown to the model: {', '.join(unknown[:10])}"
            + (", ..." if len(unknown) > 10 else ""),
            hint=f"check the labels, or pass {flag} to simulate them with the control vector (as arc-state does)",
        )
    if unknown:
        log.warning("%d perturbation(s) unknown to the model get the control vector: %s", len(unknown),
                    ", ".join(unknown[:10]))
    is_control = labels == control
    group_codes, group_names = pd.factorize(groups, sort=True)
    has_control = np.bincount(group_codes[is_control], minlength=len(group_names)) > 0
    lacking = [str(g) for g in group_names[~has_control]]
    if lacking and is_control.any() and not global_control_fallback:
        fallback = columns.flag("global_control_fallback") + ("" if columns.cli else "=True")
        raise StateError(
            f"no control cells ('{control}') in cell type(s) {', '.join(lacking[:10])}: their basal cells "
            "would come from other cell types",
            hint=f"add control cells of those cell types, leave them out with {columns.flag('celltypes')}, or pass "
            f"{fallback} to draw them from all control cells (as arc-state does)",
        )
    if lacking and is_control.any():
        log.warning("cell type(s) without controls draw basal cells from all controls: %s", ", ".join(lacking[:10]))


def keep_unpredicted(preds: np.ndarray, done: np.ndarray, adata: ad.AnnData, embed_key: str | None) -> np.ndarray:
    """Rows that could not be simulated (no control anywhere) keep their input values."""
    if done.all():
        return preds
    source = adata.obsm[embed_key] if embed_key else adata.X
    if source.shape[1] != preds.shape[1]:
        return np.nan_to_num(preds)
    rows = np.flatnonzero(~done)
    block = source[rows]
    preds[rows] = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
    return preds
