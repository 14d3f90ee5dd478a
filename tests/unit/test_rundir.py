"""Run-directory layout, its loaders, atomic checkpoints and the model registry (no training here)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from state.training.checkpoint_io import AtomicCheckpointIO, remove_stale_temp_files
from state.training.loggers import RunCSVLogger, make_wandb_logger
from state.tx import rundir
from state.tx.data.module import cap_num_workers, usable_cpu_count
from state.tx.models import registry
from state.utils.errors import StateError

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx"


# ------------------------------------------------------------------ overwrite / resume semantics


def test_plan_fresh_dir(tmp_path):
    plan = rundir.plan_run_dir(tmp_path, "run", overwrite=False)
    assert plan.path == tmp_path / "run" and plan.resume_from is None and not plan.existed
    assert not plan.path.exists()  # planning writes nothing


def test_plan_existing_dir_without_checkpoint_names_overwrite(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("a: 1\n")
    with pytest.raises(StateError, match=r"overwrite=true") as info:
        rundir.plan_run_dir(tmp_path, "run", overwrite=False)
    assert "\n" not in str(info.value)
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 1\n"


def test_plan_resumes_from_last_and_overwrite_deletes(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert rundir.plan_run_dir(tmp_path, "run", overwrite=False).resume_from == ckpt
    plan = rundir.plan_run_dir(tmp_path, "run", overwrite=True)
    assert plan.resume_from is None and plan.delete_first
    rundir.open_run_dir(plan)
    assert (tmp_path / "run").is_dir() and not ckpt.exists()


def test_plan_empty_existing_dir_is_fine(tmp_path):
    (tmp_path / "run").mkdir()
    assert rundir.plan_run_dir(tmp_path, "run", overwrite=False).resume_from is None


# ------------------------------------------------------------------ writing and reading back


class _FakeDataModule:
    """The attributes of cell-load's data module that the writers use."""

    def __init__(self) -> None:
        eye = torch.eye(3)
        self.pert_onehot_map = {np.str_(n): eye[i].clone() for i, n in enumerate(["KLF1", "MYC", "non-targeting"])}
        self.cell_type_onehot_map = {np.str_("ctA"): torch.tensor([1.0, 0.0]), np.str_("ctB"): torch.tensor([0.0, 1.0])}
        self.batch_onehot_map = {np.str_("gg1"): torch.tensor([1.0])}

    def save_state(self, path: str) -> None:
        torch.save({"toml_config_path": "/x.toml", "batch_size": 4}, path)


def _var_dims() -> dict:
    return {"input_dim": 5, "gene_dim": np.int64(7), "hvg_dim": 5, "output_dim": 5, "pert_dim": 3, "batch_dim": 1,
            "gene_names": ["g1", "g2", "g3", "g4", "g5"], "pert_names": [np.str_("KLF1"), np.str_("MYC"),
                                                                         np.str_("non-targeting")]}


def test_written_files_match_arc_state_layout_and_read_back(tmp_path):
    dm = _FakeDataModule()
    rundir.write_config(tmp_path, "name: run\n")
    rundir.write_data_module_state(tmp_path, dm)
    rundir.write_maps(tmp_path, dm)
    rundir.write_var_dims(tmp_path, _var_dims())
    for name in ("config.yaml", "data_module.torch", "pert_onehot_map.pt", "cell_type_onehot_map.torch",
                 "batch_onehot_map.torch", "var_dims.pkl", "var_dims.json", "vocab/perturbations.json",
                 "vocab/cell_types.json", "vocab/batches.json", "vocab/genes.tsv"):
        assert (tmp_path / name).is_file(), name
    # arc-state reads these with plain torch.load / pickle.load: same key types, float32 one-hots
    raw = torch.load(tmp_path / "pert_onehot_map.pt", weights_only=False)
    assert list(raw) == ["KLF1", "MYC", "non-targeting"] and isinstance(next(iter(raw)), np.str_)
    assert all(v.dtype == torch.float32 for v in raw.values())
    with (tmp_path / "var_dims.pkl").open("rb") as fh:
        assert isinstance(pickle.load(fh)["gene_dim"], np.int64)
    # our loaders return plain types
    contents = rundir.load_run_dir(tmp_path)
    assert contents.perturbations == ["KLF1", "MYC", "non-targeting"]
    assert contents.cell_types == ["ctA", "ctB"] and contents.batches == ["gg1"]
    assert contents.genes == ["g1", "g2", "g3", "g4", "g5"]
    assert type(contents.var_dims["gene_dim"]) is int and contents.var_dims["gene_dim"] == 7
    assert torch.equal(contents.pert_map["MYC"], torch.tensor([0.0, 1.0, 0.0]))


def test_loaders_read_twins_when_pickles_are_absent(tmp_path):
    dm = _FakeDataModule()
    rundir.write_maps(tmp_path, dm)
    rundir.write_var_dims(tmp_path, _var_dims())
    (tmp_path / "var_dims.pkl").unlink()
    dims = rundir.read_var_dims(tmp_path)
    assert dims["pert_dim"] == 3 and dims["gene_names"][0] == "g1" and dims["pert_names"][-1] == "non-targeting"


def test_loaders_read_twins_first(tmp_path):
    dm = _FakeDataModule()
    rundir.write_maps(tmp_path, dm)
    rundir.write_var_dims(tmp_path, _var_dims())
    with (tmp_path / "var_dims.pkl").open("wb") as fh:  # a pickle that disagrees with the twins
        pickle.dump({**_var_dims(), "pert_dim": 99, "gene_names": ["x"]}, fh)
    dims = rundir.read_var_dims(tmp_path)
    assert dims["pert_dim"] == 3 and dims["gene_names"] == ["g1", "g2", "g3", "g4", "g5"]
    assert rundir.read_genes(tmp_path)[0] == "g1"
    (tmp_path / "var_dims.json").unlink()
    (tmp_path / "vocab" / "genes.tsv").unlink()
    assert rundir.read_var_dims(tmp_path)["pert_dim"] == 99 and rundir.read_genes(tmp_path) == ["x"]


def test_loaders_refuse_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    with (tmp_path / "var_dims.pkl").open("wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(StateError, match="refusing"):
        rundir.read_var_dims(tmp_path)
    assert (tmp_path / "victim").is_dir()


def test_missing_checkpoint_lists_present_ones(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(StateError, match="last.ckpt"):
        rundir.checkpoint_path(tmp_path, "final.ckpt")


def test_checkpoint_names_files_and_paths_resolve_by_one_rule(tmp_path, monkeypatch):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("final.ckpt", "best.ckpt", "last.ckpt", "best-v1.ckpt"):
        (folder / name).write_bytes(b"x")
    run = tmp_path / "run"
    for given, expected in [("final", "final.ckpt"), ("best", "best.ckpt"), ("last.ckpt", "last.ckpt"),
                            ("best-v1.ckpt", "best-v1.ckpt"), ("best-v1", "best-v1.ckpt")]:
        assert rundir.checkpoint_path(run, given) == folder / expected
    assert rundir.checkpoint_path(run) == folder / "final.ckpt"  # infer's and the API's default
    assert rundir.checkpoint_path(run, None, default=rundir.PREDICT_CHECKPOINT) == folder / "last.ckpt"
    elsewhere = tmp_path / "other" / "model.ckpt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    assert rundir.checkpoint_path(run, elsewhere) == elsewhere
    monkeypatch.chdir(elsewhere.parent)
    assert rundir.checkpoint_path(run, "model.ckpt") == Path("model.ckpt")  # a bare file name in the cwd
    with pytest.raises(StateError, match=r"checkpoint not found: .*other.gone.ckpt \(available in .*run.checkpoints: "
                       r"best-v1.ckpt, best.ckpt, final.ckpt, last.ckpt\)"):
        rundir.checkpoint_path(run, elsewhere.parent / "gone.ckpt")


def test_arc_state_run_dir_loads_without_twins():
    contents = rundir.load_run_dir(FIXTURES / "perturb_mean" / "run")
    assert contents.perturbations[0] == "TXG0023" and contents.perturbations[-1] == "non-targeting"
    assert contents.cell_types == ["ctA", "ctB"] and contents.batches == ["gg1", "gg2", "gg3"]
    assert len(contents.genes) == 64 and contents.var_dims["gene_dim"] == 256


# ------------------------------------------------------------------ atomic checkpoints


class _CrashingIO(AtomicCheckpointIO):
    """Writes half of the checkpoint, then dies (what kill -9 during torch.save looks like)."""

    def write_checkpoint(self, checkpoint, fh):
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        fh.write(data[: len(data) // 2])
        fh.flush()
        raise KeyboardInterrupt("simulated crash")


def test_crash_during_checkpoint_write_keeps_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "w": torch.ones(1000)}, target)
    with pytest.raises(KeyboardInterrupt):
        _CrashingIO().save_checkpoint({"global_step": 6, "w": torch.zeros(1000)}, target)
    loaded = AtomicCheckpointIO().load_checkpoint(target)
    assert loaded["global_step"] == 4 and torch.equal(loaded["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"half")
    (tmp_path / "last.ckpt").write_bytes(b"whole")
    remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------ CSV metrics on resume


def test_csv_logger_keeps_rows_before_the_resumed_step(tmp_path):
    log_dir = tmp_path / "run" / "version_0"
    log_dir.mkdir(parents=True)
    (log_dir / "metrics.csv").write_text("epoch,step,train_loss\n0,1,0.9\n0,3,0.8\n0,5,0.7\n")
    logger = RunCSVLogger(tmp_path, "run", keep_rows_before_step=4)
    logger.log_metrics({"val_loss": 0.5}, step=5)
    logger.save()
    text = (log_dir / "metrics.csv").read_text().splitlines()
    assert text[0].split(",") == ["epoch", "step", "train_loss", "val_loss"]
    assert [line.split(",")[1] for line in text[1:]] == ["1", "3", "5"]
    assert text[-1].endswith(",0.5")


# ------------------------------------------------------------------ W&B never blocks training


def test_wandb_disabled_or_not_logged_in_gives_none(tmp_path, monkeypatch, caplog):
    kwargs = {"run_name": "r", "project": "p", "entity": None, "save_dir": tmp_path / "wb", "tags": [],
              "config": {}, "run_dir": tmp_path}
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert make_wandb_logger(**kwargs) is None
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    with caplog.at_level("WARNING", logger="state"):
        assert make_wandb_logger(**kwargs) is None
    assert "not logged in" in caplog.text


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("state", "state"), ("PertSets", "state"), ("neuralot", "state"), ("GlobalSimpleSum", "perturb_mean"),
     ("perturb_mean", "perturb_mean"), ("CellTypeMean", "context_mean"), ("context_mean", "context_mean")],
)
def test_registry_aliases_are_case_insensitive(name, canonical):
    assert registry.model_entry(name).canonical == canonical


@pytest.mark.parametrize("name", ["EmbedSum", "old_neuralot", "decoder_only", "pseudobulk", "CPA", "scVI",
                                  "scGPT-genetic", "scgpt-chemical"])
def test_registry_zoo_models_resolve_to_a_class(name):
    # every model name arc-state accepts is implemented (tests/integration/test_tx_zoo.py trains each)
    assert isinstance(registry.model_class(name), type)


def test_registry_unknown_name_lists_choices():
    with pytest.raises(StateError, match=r"unknown model.name 'transformer'.*context_mean"):
        registry.model_entry("transformer")


def test_registry_picks_class_from_checkpoint_markers():
    assert registry.entry_for_checkpoint({"pert_mean_offsets": {}}).canonical == "perturb_mean"
    assert registry.entry_for_checkpoint({"celltype_pert_means": {}}).canonical == "context_mean"
    assert registry.entry_for_checkpoint({"state_dict": {}}).canonical == "state"


def test_num_workers_capped_at_usable_cpus():
    cpus = usable_cpu_count()
    assert cap_num_workers(cpus + 10) == cpus
    assert cap_num_workers(0) == 0


def test_parser_defaults_are_the_run_directory_rule():
    # The parser stays import-light (no rundir import), so this test holds the two spellings together.
    from state.cli import build_parser

    predict = build_parser().parse_args(["tx", "predict", "--output-dir", "run"])
    infer = build_parser().parse_args(["tx", "infer", "--model-dir", "m", "--adata", "a.h5ad"])
    assert predict.checkpoint == rundir.PREDICT_CHECKPOINT
    assert infer.checkpoint in (None, rundir.INFER_CHECKPOINT)
