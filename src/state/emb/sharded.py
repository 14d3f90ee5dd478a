"""``state emb transform`` over many files, processes and machines, resumable.

``transform_many`` is the engine behind ``--input`` repeated / a folder / a glob, ``--shard I/N``,
``--devices K`` and ``--merge``. It runs in three steps:

1. plan (every process): expand the inputs, load the model once on the CPU to fingerprint it, map
   every file's genes, check the LanceDB table, and claim the work folder's manifest. Every bad
   input fails here, before anything is computed or written.
2. compute: the process's share of the work units (see :mod:`state.emb.work_units`), skipping done
   ones, each written atomically. ``--devices K`` starts K processes with Lightning Fabric's
   ``ddp_spawn`` launcher (gloo on CPU, nccl on CUDA; process k uses ``cuda:k``).
3. merge (``--merge``, a run without ``--shard``, or rank 0 of ``--devices K`` after a barrier):
   each file's ``.h5ad`` copy with ``obsm[embed_key]`` or ``.npy`` is assembled from its units and
   renamed into place; LanceDB gets each file's rows in one commit, recorded so that it happens once.

A unit's rows are embedded exactly as the single-process path embeds them (same sampling blocks,
same batches), so the outputs are bit-identical to it for a fixed ``--seed``, whatever the split.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from state.emb.tokenize import SAMPLING_BLOCK, GeneMapping
from state.emb.transform import (
    DEFAULT_CHUNK_ROWS,
    MAX_IN_MEMORY_CSC_NNZ,
    RowReader,
    TransformResult,
    _open_target,
)
from state.emb.work_units import (
    Shard,
    Unit,
    WorkDir,
    expand_inputs,
    input_identity,
    model_identity,
    take,
    units_of,
)
from state.io.h5ad import open_h5ad, read_obs, read_var
from state.utils.errors import StateError

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".h5ad", ".npy")


@dataclass
class InputPlan:
    path: Path
    stem: str
    n_obs: int
    mapping: GeneMapping
    csc: bool
    output: Path | None


@dataclass
class Plan:
    """Everything a worker process needs (picklable: it crosses the spawn launcher)."""

    inputs: list[InputPlan]
    work: WorkDir
    width: int
    unit_rows: int
    seed: int | None
    model: dict  # load_se_model keyword arguments (device excluded)
    batch_size: int | None
    embed_key: str
    lancedb: Path | None
    lancedb_batch_size: int
    max_csc_nnz: int
    units: list[Unit] = field(default_factory=list)

    def input(self, stem: str) -> InputPlan:
        return next(i for i in self.inputs if i.stem == stem)


def transform_many(
    inputs: list[str | os.PathLike],
    *,
    output: str | os.PathLike | None = None,
    lancedb: str | os.PathLike | None = None,
    model_folder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    embed_key: str = "X_state",
    protein_embeddings: str | os.PathLike | None = None,
    batch_size: int | None = None,
    gene_column: str | None = None,
    seed: int | None = None,
    lancedb_batch_size: int = 1000,
    shard: Shard | None = None,
    devices: int | None = None,
    merge: bool = False,
    work_dir: str | os.PathLike | None = None,
    unit_rows: int = DEFAULT_CHUNK_ROWS,
    output_format: str = "h5ad",
    device: str | None = None,
    max_csc_nnz: int = MAX_IN_MEMORY_CSC_NNZ,
) -> TransformResult:
    """Embed every cell of ``inputs`` (files, folders, globs); see the module docstring for the steps.

    Without ``shard`` (and with or without ``devices``) the outputs are assembled at the end; with
    ``shard`` only that shard's units are computed, and a later call with ``merge=True`` assembles.
    """
    if shard is not None and merge:
        raise StateError("--merge assembles every shard's units; it does not take --shard",
                         hint="run the shards with --shard I/N, then the same command with --merge and no --shard")
    if devices is not None and devices < 1:
        raise StateError(f"--devices must be at least 1, got {devices}", hint="pass the number of local processes")
    plan = make_plan(inputs, output=output, lancedb=lancedb, model_folder=model_folder, checkpoint=checkpoint,
                     config=config, embed_key=embed_key, protein_embeddings=protein_embeddings,
                     batch_size=batch_size, gene_column=gene_column, seed=seed,
                     lancedb_batch_size=lancedb_batch_size, work_dir=work_dir, unit_rows=unit_rows,
                     output_format=output_format, max_csc_nnz=max_csc_nnz, create=not merge)
    computed = 0
    if not merge:
        if devices is not None and devices > 1:
            computed = launch(plan, shard, devices, device=device)
        else:
            computed = compute_units(plan, take(plan.units, shard), device=device)
        log.info("computed %d work units (%s)", computed, f"shard {shard}" if shard else "all")
    if shard is None:
        merge_outputs(plan)
    outputs = [str(p) for p in [*(i.output for i in plan.inputs if i.output), plan.lancedb] if p is not None]
    return TransformResult(n_cells=sum(i.n_obs for i in plan.inputs), width=plan.width, outputs=outputs,
                           computed_units=computed)


# ---------------------------------------------------------------------------------------------- 1. plan
def _outputs(paths: list[Path], output, output_format: str) -> list[Path | None]:
    if output is None:
        return [None] * len(paths)
    output = Path(output)
    if output.suffix.lower() in OUTPUT_SUFFIXES:
        if len(paths) > 1:
            raise StateError(f"--output {output} is one file but {len(paths)} inputs were given",
                             hint="pass a folder as --output; each input gets <folder>/<name>.h5ad (or .npy)")
        return [output]
    if output.exists() and not output.is_dir():
        raise StateError(f"--output {output} is a file without a .h5ad / .npy suffix",
                         hint="pass a .h5ad or .npy file, or a folder for several inputs")
    if output_format not in ("h5ad", "npy"):
        raise StateError(f"--output-format {output_format!r} is not h5ad or npy", hint="pass h5ad or npy")
    return [output / f"{p.stem}.{output_format}" for p in paths]


def make_plan(inputs, *, output, lancedb, model_folder, checkpoint, config, embed_key, protein_embeddings,
              batch_size, gene_column, seed, lancedb_batch_size, work_dir, unit_rows, output_format, max_csc_nnz,
              create: bool) -> Plan:
    from state.emb.checkpoint import load_se_model
    from state.emb.tokenize import map_genes
    from state.emb.transform import _check_targets
    from state.emb.vectordb import check_table_compatible, record_schema

    if unit_rows < SAMPLING_BLOCK or unit_rows % SAMPLING_BLOCK:
        raise StateError(f"--unit-rows {unit_rows} is not a positive multiple of {SAMPLING_BLOCK}",
                         hint=f"pass a multiple of {SAMPLING_BLOCK} (the tokenizer's sampling block)")
    paths = expand_inputs(inputs)
    outputs = _outputs(paths, output, output_format)
    if output is None and lancedb is None:
        _check_targets(None, None, batch_size)  # "nothing to write", before the model is loaded
    if work_dir is None:
        anchor = output if output is not None else lancedb
        work_dir = Path(str(anchor).rstrip("/\\") + ".parts")
    model_args = dict(model_folder=model_folder, checkpoint=checkpoint, config=config,
                      protein_embeddings=protein_embeddings)
    loaded = load_se_model(**model_args, device="cpu")
    width = loaded.arch.embedding_width
    plans, identities, first_schema = [], {}, None
    for path, out in zip(paths, outputs):
        with open_h5ad(path) as handle:
            var, obs = read_var(handle), read_obs(handle)
            if len(obs) == 0:
                raise StateError(f"{path} has no cells", hint="pass non-empty h5ad files")
            reader = RowReader(handle, n_obs=len(obs), n_vars=len(var), max_csc_nnz=max_csc_nnz)
            mapping = map_genes(var, loaded.gene_to_index, gene_column=gene_column, where=str(path))
        if lancedb is not None:
            schema = record_schema(width, obs)
            check_table_compatible(Path(lancedb), schema)
            if plans and schema != first_schema:  # else the merge would append some files and refuse the next
                raise StateError(f"{path} and {paths[0]} have different obs columns; one LanceDB table cannot "
                                 "hold both", hint="give them the same obs columns, or use one --lancedb per file set")
            first_schema = schema if not plans else first_schema
        plans.append(InputPlan(path, path.stem, len(obs), mapping, reader.kind == "csc", out))
        identities[path.stem] = input_identity(path, n_obs=len(obs), n_vars=len(var), genes=mapping.local_to_global)
    _check_targets(outputs[0], lancedb, batch_size)  # creates the output folder: only once the inputs are fine
    work = WorkDir(work_dir)
    manifest = {"model_sha256": model_identity(loaded.model), "checkpoint": str(loaded.checkpoint_path),
                "seed": seed, "unit_rows": unit_rows, "width": width, "inputs": identities}
    if not create and not (work.path / "manifest.json").is_file():
        raise StateError(f"no work units to merge: {work.path}/manifest.json does not exist",
                         hint="run the shards first (the same command with --shard I/N), or pass their --work-dir")
    work.claim(manifest)
    plan = Plan(inputs=plans, work=work, width=width, unit_rows=unit_rows, seed=seed, model=model_args,
                batch_size=batch_size, embed_key=embed_key, lancedb=Path(lancedb) if lancedb else None,
                lancedb_batch_size=lancedb_batch_size, max_csc_nnz=max_csc_nnz)
    plan.units = [u for i in plans for u in units_of(i.stem, i.n_obs, unit_rows)]
    return plan


# ---------------------------------------------------------------------------------------------- 2. compute
def compute_units(plan: Plan, units: list[Unit], *, device: str | torch.device | None = None) -> int:
    """Embed the units not done yet; returns how many were computed."""
    from state.emb.checkpoint import load_se_model
    from state.emb.embed import SEEmbedder

    todo = [u for u in units if not plan.work.is_done(u)]
    log.info("%d of %d work units to compute (%d already done)", len(todo), len(units), len(units) - len(todo))
    if not todo:
        return 0
    loaded = load_se_model(**plan.model, device=device)
    done = 0
    for stem in dict.fromkeys(u.file for u in todo):
        spec = plan.input(stem)
        mine = {u.first: u for u in todo if u.file == stem}
        embedder = SEEmbedder(loaded, spec.mapping, batch_size=plan.batch_size, seed=plan.seed)
        with open_h5ad(spec.path) as handle:
            reader = RowReader(handle, n_obs=spec.n_obs, n_vars=spec.mapping.n_genes, max_csc_nnz=plan.max_csc_nnz)
            chunks = ((u.first, reader.read(u.first, u.stop)) for u in mine.values())
            for first, emb in embedder.embed_chunks(chunks):
                plan.work.write(mine[first], emb)
                done += 1
    return done


def launch(plan: Plan, shard: Shard | None, devices: int, *, device: str | None = None) -> int:
    """K local processes through Lightning Fabric's spawn launcher; returns the units computed by all."""
    from lightning.fabric import Fabric

    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    fabric = Fabric(accelerator="cuda" if cuda else "cpu", devices=devices, strategy="ddp_spawn")
    return int(fabric.launch(_rank_main, _Sealed((plan, shard))))


class _Sealed:
    """Hides the plan from Fabric's launch, which walks dataclass arguments and rebuilds them (frozen ones fail)."""

    def __init__(self, value) -> None:
        self.value = value


def _rank_main(fabric, sealed: _Sealed) -> int:
    plan, shard = sealed.value
    if fabric.device.type == "cpu":  # the cores are shared between the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // fabric.world_size))
    units = take(plan.units, shard, fabric.global_rank, fabric.world_size)
    count = compute_units(plan, units, device=fabric.device)
    total = fabric.all_reduce(torch.tensor(count, dtype=torch.long, device=fabric.device), reduce_op="sum")
    fabric.barrier()
    return int(total)


# ---------------------------------------------------------------------------------------------- 3. merge
def merge_outputs(plan: Plan) -> None:
    """Assemble every file's outputs from its units; each output / LanceDB append happens once."""
    work = plan.work
    for spec in plan.inputs:
        units = units_of(spec.stem, spec.n_obs, plan.unit_rows)
        missing = [u for u in units if not work.is_done(u)]
        if missing:
            raise StateError(
                f"{len(missing)} of {len(units)} work units of {spec.path} are not done in {work.path} "
                f"(first missing: rows {missing[0].first}-{missing[0].stop - 1})",
                hint="run the missing shards (the same command with --shard I/N) before --merge")
    for spec in plan.inputs:
        need_output = spec.output is not None and work.read_marker(spec.stem, "output") is None
        need_db = plan.lancedb is not None and not _lancedb_already_done(plan, spec)
        if need_output or need_db:
            _merge_one(plan, spec, output=spec.output if need_output else None, lancedb=need_db)
        work.drop_arrays(spec.stem)


def _merge_one(plan: Plan, spec: InputPlan, *, output: Path | None, lancedb: bool) -> None:
    from state.emb.vectordb import write_embeddings

    work = plan.work
    shape = (spec.n_obs, plan.width)
    with contextlib.ExitStack() as stack:
        target = _open_target(stack, spec.path, output, plan.lancedb if lancedb else None, plan.embed_key, shape,
                              csc_input=spec.csc)
        for unit in units_of(spec.stem, spec.n_obs, plan.unit_rows):
            target.store[unit.first : unit.stop] = work.read(unit, plan.width)
        if lancedb:
            with open_h5ad(spec.path) as handle:
                obs = read_obs(handle)
            rows_before = _table_rows(plan.lancedb)
            work.write_marker(spec.stem, "lancedb_pending", {"rows_before": rows_before, "rows": spec.n_obs})
            write_embeddings(plan.lancedb, target.store, obs, embed_key=plan.embed_key, dataset=spec.stem or "unknown",
                             batch_size=plan.lancedb_batch_size)
            work.write_marker(spec.stem, "lancedb", {"rows": spec.n_obs})
            work.marker(spec.stem, "lancedb_pending").unlink()
        target.finish(spec.path, plan.embed_key)
    if output is not None:
        work.write_marker(spec.stem, "output", {"path": str(output)})
        log.info("merged %d cells of %s -> %s", spec.n_obs, spec.path, output)


def _table_rows(db: Path) -> int:
    from state.emb.vectordb import TABLE_NAME, _lancedb

    if not (db / f"{TABLE_NAME}.lance").is_dir():
        return 0
    return int(_lancedb().connect(str(db)).open_table(TABLE_NAME).count_rows())


def _lancedb_already_done(plan: Plan, spec: InputPlan) -> bool:
    """Done, or committed just before a crash (the table grew by exactly this file's rows)."""
    work = plan.work
    if work.read_marker(spec.stem, "lancedb") is not None:
        return True
    pending = work.read_marker(spec.stem, "lancedb_pending")
    if pending is None:
        return False
    rows = _table_rows(plan.lancedb)
    if rows == pending["rows_before"] + pending["rows"]:
        work.write_marker(spec.stem, "lancedb", {"rows": spec.n_obs})
        work.marker(spec.stem, "lancedb_pending").unlink()
        return True
    if rows == pending["rows_before"]:
        return False
    raise StateError(
        f"{plan.lancedb}: an interrupted merge of {spec.path} left the table with {rows} rows, neither the "
        f"{pending['rows_before']} before nor the {pending['rows_before'] + pending['rows']} after its append",
        hint=f"check the table; then delete {work.marker(spec.stem, 'lancedb_pending')} to append this file again")
