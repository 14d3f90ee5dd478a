"""Dataset tables: the per-split CSVs that list the training / validation h5ad files.

Columns: ``names`` (dataset id), ``path`` (h5ad), ``num_cells``, ``num_genes`` and optionally
``species`` and ``groupid_for_de``. Rows are de-duplicated and sorted by name; a dataset's
``dataset_num`` is its position in that sorted list, so train and validation numbering differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from state.utils.errors import StateError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("names", "path", "num_cells", "num_genes")
# arc-state's fallback when a table leaves num_genes empty.
DEFAULT_NUM_GENES = 8000


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: Path
    num_cells: int
    num_genes: int
    species: str | None = None
    groupid_for_de: str = "leiden"


def read_dataset_table(
    csv_path: str | Path, *, split: str, filter_by_species: str | list[str] | None = None
) -> list[DatasetEntry]:
    """Read one split's CSV into entries sorted by name, checking that every h5ad exists."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise StateError(
            f"{split} dataset table not found: {csv_path}",
            hint=f"set dataset.<profile>.{split} to an existing CSV (state emb preprocess writes one)",
        )
    try:
        frame = pd.read_csv(csv_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise StateError(f"{csv_path} is not a readable CSV ({exc})", hint="check the file") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise StateError(
            f"{csv_path} lacks column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}",
            hint="run `state emb preprocess`, which writes num_cells and num_genes for every dataset",
        )
    frame = frame.drop_duplicates()
    if filter_by_species is not None and "species" in frame.columns:
        wanted = [filter_by_species] if isinstance(filter_by_species, str) else list(filter_by_species)
        frame = frame[frame["species"].isin(wanted)]
    if frame.empty:
        raise StateError(f"{csv_path} lists no datasets", hint="add rows species,path,names,num_cells,num_genes")
    duplicated = frame["names"][frame["names"].duplicated()].unique().tolist()
    if duplicated:
        raise StateError(
            f"{csv_path}: dataset name(s) {', '.join(map(str, duplicated[:5]))} appear with different rows",
            hint="give every dataset a unique name",
        )
    entries = [_entry(row, csv_path) for row in frame.sort_values("names").itertuples(index=False)]
    _check_files_exist(entries, csv_path)
    return entries


def _entry(row, csv_path: Path) -> DatasetEntry:
    path = Path(str(row.path))
    if not path.is_absolute() and not path.exists():
        # Relative paths are read relative to the CSV's folder when not found from the cwd.
        path = csv_path.parent / path
    num_genes = row.num_genes
    if pd.isna(num_genes):
        num_genes = DEFAULT_NUM_GENES
    if pd.isna(row.num_cells) or int(row.num_cells) <= 0:
        raise StateError(f"{csv_path}: dataset {row.names} has num_cells={row.num_cells}", hint="fix the row")
    species = getattr(row, "species", None)
    group = getattr(row, "groupid_for_de", "leiden")
    return DatasetEntry(
        name=str(row.names),
        path=path,
        num_cells=int(row.num_cells),
        num_genes=int(num_genes),
        species=None if species is None or pd.isna(species) else str(species),
        groupid_for_de="leiden" if group is None or pd.isna(group) else str(group),
    )


def _check_files_exist(entries: list[DatasetEntry], csv_path: Path) -> None:
    missing = [e for e in entries if not e.path.is_file()]
    if not missing:
        return
    shown = ", ".join(f"{e.name} -> {e.path}" for e in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise StateError(
        f"{csv_path} names {len(missing)} missing h5ad file(s): {shown}{more}",
        hint="fix the path column or remove those rows",
    )
