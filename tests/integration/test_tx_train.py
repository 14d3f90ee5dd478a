"""`state tx train` end to end on CPU: run-dir contents, arc-state equivalence, resume, crash safety,
DDP, and one-line errors for bad input."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers.runs import TINY_STATE
from helpers.synthetic import make_processed_dataset, write_toml
from state.cli import run as cli_run
from state.io.safe_load import safe_pickle_load, safe_torch_load
from state.tx.config.compose import compose_tx_config
from state.tx.train.run import train

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "tx"
ARC_FILES = ("config.yaml", "data_module.torch", "var_dims.pkl", "pert_onehot_map.pt", "cell_type_onehot_map.torch",
             "batch_onehot_map.torch", "version_0/metrics.csv", "version_0/hparams.yaml", "checkpoints/last.ckpt",
             "checkpoints/final.ckpt")
# model/state|perturb_mean|context_mean.yaml keys of arc-state 0.11.3, absent from the 0.11.1 fixtures
ARC_0113_KEYS = {"log1p_from_raw_counts": False, "counts_target_sum": 10000}


def _without_0113_keys(hparams: dict) -> dict:
    assert {k: hparams[k] for k in ARC_0113_KEYS} == ARC_0113_KEYS
    return {k: v for k, v in hparams.items() if k not in ARC_0113_KEYS}


OUR_FILES = ("var_dims.json", "vocab/perturbations.json", "vocab/cell_types.json", "vocab/batches.json",
             "vocab/genes.tsv")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    data = make_processed_dataset(root / "data", n_cells=240, n_genes=40, n_hvgs=16, n_perts=4, seed=0)
    toml = write_toml(root / "split.toml", dataset_name="synth", data_path=data, kind="fewshot")
    return {"root": root, "data": data, "toml": toml}


def _data_overrides(toml: Path, **extra: str) -> list[str]:
    base = {"data.kwargs.toml_config_path": str(toml), "data.kwargs.embed_key": "X_hvg",
            "data.kwargs.output_space": "gene", "data.kwargs.num_workers": "0",
            "data.kwargs.control_pert": "non-targeting", "use_wandb": "false"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train_args(synth, out: Path, name: str, *more: str, steps: int = 4) -> list[str]:
    return [*_data_overrides(synth["toml"]), f"output_dir={out}", f"name={name}", f"training.max_steps={steps}",
            "training.val_freq=2", "training.batch_size=2", *more]


# ------------------------------------------------------------------ same config as arc-state's fixtures


@pytest.fixture(scope="module")
def fixture_toml(tmp_path_factory):
    data = FIXTURES / "state_llama" / "data" / "processed"
    if not data.is_dir():
        pytest.skip("tx/state_llama fixture data not copied")
    toml = tmp_path_factory.mktemp("fx") / "split_fewshot.toml"
    toml.write_text(f'[datasets]\nsynth = "{data}"\n[training]\nsynth = "train"\n'
                    '[fewshot."synth.ctB"]\nval = ["TXG0023", "TXG0035"]\ntest = ["TXG0057", "TXG0062"]\n')
    return toml


@pytest.mark.parametrize(("model", "stats_key"), [("perturb_mean", "pert_mean_offsets"),
                                                  ("context_mean", "celltype_pert_means")])
def test_mean_baseline_run_matches_arc_state(model, stats_key, fixture_toml, tmp_path, caplog):
    """The fixture's own command on its own data: same files, same hparams, same statistics."""
    overrides = [*_data_overrides(fixture_toml, **{"data.kwargs.batch_col": "gem_group"}),
                 "training.max_steps=50", "training.val_freq=25", "training.ckpt_every_n_steps=25",
                 "training.batch_size=4", f"model={model}", "model.kwargs.cell_set_len=16",
                 "model.kwargs.hidden_dim=32", "+model.kwargs.decoder_hidden_dims=[48,48]",
                 "name=run", f"output_dir={tmp_path}", "use_wandb=true"]  # W&B is disabled in tests: must warn
    with caplog.at_level("WARNING", logger="state"):
        result = train(compose_tx_config(overrides))
    assert "WANDB_MODE=disabled" in caplog.text
    run = result.run_dir
    for name in ARC_FILES + OUR_FILES:
        assert (run / name).is_file(), name
    ours = safe_torch_load(run / "checkpoints" / "final.ckpt")
    ref = safe_torch_load(FIXTURES / model / "run" / "checkpoints" / "final.ckpt")
    assert ours["global_step"] == 1  # statistics baselines run a single step
    assert _without_0113_keys(ours["hyper_parameters"]) == ref["hyper_parameters"]
    assert set(ours) == set(ref)
    for key, value in ref[stats_key].items():
        np.testing.assert_allclose(ours[stats_key][key], value, atol=1e-5)
    for key, value in ref["state_dict"].items():  # same seed -> same initial decoder weights
        assert torch.equal(ours["state_dict"][key], value), key
    ref_dm = safe_torch_load(FIXTURES / model / "run" / "data_module.torch")
    ours_dm = safe_torch_load(run / "data_module.torch")
    assert set(ours_dm) == set(ref_dm)
    assert {k: v for k, v in ours_dm.items() if k != "toml_config_path"} == {
        k: v for k, v in ref_dm.items() if k != "toml_config_path"}
    ref_dims = safe_pickle_load(FIXTURES / model / "run" / "var_dims.pkl")
    ours_dims = safe_pickle_load(run / "var_dims.pkl")
    assert ours_dims.keys() == ref_dims.keys()
    assert [str(p) for p in ours_dims["pert_names"]] == [str(p) for p in ref_dims["pert_names"]]
    assert list(ours_dims["gene_names"]) == list(ref_dims["gene_names"])
    for file_name in ("pert_onehot_map.pt", "cell_type_onehot_map.torch", "batch_onehot_map.torch"):
        ours_map, ref_map = safe_torch_load(run / file_name), safe_torch_load(FIXTURES / model / "run" / file_name)
        assert list(ours_map) == list(ref_map) and all(torch.equal(ours_map[k], ref_map[k]) for k in ref_map)


# ------------------------------------------------------------------ the State Transition model


def test_state_model_trains_resumes_and_survives_a_crash(synth, tmp_path, monkeypatch):
    args = _train_args(synth, tmp_path, "st", *TINY_STATE)
    first = train(compose_tx_config(args))
    run = first.run_dir
    for name in (*ARC_FILES, "checkpoints/best.ckpt", *OUR_FILES):
        assert (run / name).is_file(), name
    assert first.global_step == 4 and set(first.checkpoint_paths) == {"best.ckpt", "last.ckpt", "final.ckpt"}
    assert np.isfinite(first.metrics["val_loss"]) and "train/gradient_norm" in first.metrics
    ckpt = safe_torch_load(run / "checkpoints" / "last.ckpt")
    reference = safe_torch_load(FIXTURES / "state_llama" / "run" / "checkpoints" / "final.ckpt")
    assert set(_without_0113_keys(ckpt["hyper_parameters"])) == set(reference["hyper_parameters"])
    assert set(ckpt) == set(reference)
    # the fixture also had model.kwargs.batch_encoder=true
    assert ckpt["state_dict"].keys() == reference["state_dict"].keys() - {"batch_encoder.weight"}

    # resume: same name without overwrite continues from last.ckpt with its optimizer state
    resumed = train(compose_tx_config(_train_args(synth, tmp_path, "st", *TINY_STATE, steps=6)))
    assert resumed.resumed_from == run / "checkpoints" / "last.ckpt" and resumed.global_step == 6
    last = safe_torch_load(run / "checkpoints" / "last.ckpt")
    adam_steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {6.0}  # 4 restored + 2 new; a fresh optimizer would say 2
    with (run / "version_0" / "metrics.csv").open() as fh:
        steps_logged = [row["step"] for row in csv.DictReader(fh)]
    assert "1" in steps_logged and "5" in steps_logged  # rows from before the resume are kept

    # crash in the middle of writing last.ckpt: the previous file stays intact and loadable
    from state.training import checkpoint_io

    def half_then_crash(self, checkpoint, fh):
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        fh.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(checkpoint_io.AtomicCheckpointIO, "write_checkpoint", half_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose_tx_config(_train_args(synth, tmp_path, "st", *TINY_STATE, steps=8)))
    assert safe_torch_load(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    again = train(compose_tx_config(_train_args(synth, tmp_path, "st", *TINY_STATE, steps=8)))
    assert again.global_step == 8 and safe_torch_load(run / "checkpoints" / "last.ckpt")["global_step"] == 8


def test_ddp_on_two_cpu_processes(synth, tmp_path):
    """training.devices=2 training.strategy=ddp: Lightning re-launches the CLI for rank 1 (gloo on CPU)."""
    args = _train_args(synth, tmp_path, "ddp", *TINY_STATE, "training.devices=2", "training.strategy=ddp", steps=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "state", "tx", "train", *args], capture_output=True, text=True,
                          env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MEMBER: 2/2" in proc.stderr
    ckpt = safe_torch_load(tmp_path / "ddp" / "checkpoints" / "final.ckpt")
    assert ckpt["global_step"] == 3


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written


def _toml(root: Path, text: str) -> Path:
    path = root / f"bad_{abs(hash(text))}.toml"
    path.write_text(text)
    return path


BAD_INPUTS = {
    "toml_missing": (lambda s: {"data.kwargs.toml_config_path": "/nonexistent/split.toml"}, "split.toml"),
    "toml_syntax": (lambda s: {"data.kwargs.toml_config_path": _toml(s["root"], "[datasets\nx = 1\n")}, "parsed"),
    "dataset_path_missing": (lambda s: {"data.kwargs.toml_config_path": _toml(
        s["root"], '[datasets]\nsynth = "/nonexistent/data"\n[training]\nsynth = "train"\n')}, "/nonexistent/data"),
    "celltype_absent": (lambda s: {"data.kwargs.toml_config_path": _toml(
        s["root"], f'[datasets]\nsynth = "{s["data"]}"\n[training]\nsynth = "train"\n'
                   '[zeroshot]\n"synth.Neuron" = "test"\n')}, "Neuron"),
    "perturbation_absent": (lambda s: {"data.kwargs.toml_config_path": _toml(
        s["root"], f'[datasets]\nsynth = "{s["data"]}"\n[training]\nsynth = "train"\n'
                   '[fewshot."synth.K562"]\nval = []\ntest = ["NOPE1"]\n')}, "NOPE1"),
    "control_absent": (lambda s: {"data.kwargs.control_pert": "DMSO"}, "control_pert"),
    "pert_col_missing": (lambda s: {"data.kwargs.pert_col": "drug"}, "data.kwargs.pert_col"),
    "cell_type_key_missing": (lambda s: {"data.kwargs.cell_type_key": "celltype"}, "data.kwargs.cell_type_key"),
    "batch_col_missing": (lambda s: {"data.kwargs.batch_col": "plate"}, "data.kwargs.batch_col"),
    "embed_key_missing": (lambda s: {"data.kwargs.embed_key": "X_uce"}, "X_uce"),
    "model_unknown": (lambda s: {"model.name": "transformer"}, "transformer"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_dir(case, synth, tmp_path, capsys):
    make_overrides, expected = BAD_INPUTS[case]
    overrides = {k: str(v) for k, v in make_overrides(synth).items()}
    model = overrides.pop("model", "perturb_mean")
    args = [*_data_overrides(synth["toml"], **overrides), f"output_dir={tmp_path}", "name=run", f"model={model}"]
    code = cli_run(["tx", "train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_bad_input_with_overwrite_leaves_existing_run_untouched(synth, tmp_path, capsys):
    existing = tmp_path / "run"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    code = cli_run(["tx", "train", *_data_overrides(synth["toml"], **{"data.kwargs.control_pert": "DMSO"}),
                    f"output_dir={tmp_path}", "name=run", "overwrite=true", "model=perturb_mean"])
    assert code == 2 and "control_pert" in capsys.readouterr().err
    assert (existing / "keep.txt").read_text() == "precious"


def test_existing_run_dir_without_checkpoint_asks_for_overwrite(synth, tmp_path, capsys):
    existing = tmp_path / "run"
    existing.mkdir()
    (existing / "config.yaml").write_text("name: run\n")
    code = cli_run(["tx", "train", *_data_overrides(synth["toml"]), f"output_dir={tmp_path}", "name=run",
                    "model=perturb_mean"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "overwrite=true" in err[0]
    assert sorted(p.name for p in existing.iterdir()) == ["config.yaml"]


def test_resuming_a_run_of_another_model_shape_is_one_line(synth, tmp_path, capsys):
    assert cli_run(["tx", "train", *_train_args(synth, tmp_path, "st", *TINY_STATE, steps=2)]) == 0
    run = tmp_path / "st"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    wider = [a.replace("hidden_dim=32", "hidden_dim=16") for a in TINY_STATE]
    assert cli_run(["tx", "train", *_train_args(synth, tmp_path, "st", *wider, steps=4)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: run ") and str(run) in err[0], err
    assert "[32" in err[0] and "vs [16" in err[0] and "name=" in err[0] and "overwrite=true" in err[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing rewritten


def test_scgpt_as_shipped_is_refused_before_anything_is_written(synth, tmp_path, capsys, monkeypatch):
    from state.tx.train import memory_guard

    # 16 HVGs: ~15 GB per step as shipped (64 HVGs: ~65 GB); a 4 GB machine must be told, not killed
    monkeypatch.setattr(memory_guard, "available_bytes", lambda: (4 * 10**9, "available in RAM"))
    args = [*_data_overrides(synth["toml"]), f"output_dir={tmp_path}", "name=big", "model=scgpt-genetic",
            "model.kwargs.pretrained_path=null", "training=scgpt"]
    assert cli_run(["tx", "train", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "training step needs" in err[0] and "model.kwargs.cell_sentence_len" in err[0], err
    assert not (tmp_path / "big").exists()


def test_raw_count_keys_train_carry_and_validate(synth, tmp_path, capsys):
    raw = ["model=perturb_mean", "+model.kwargs.log1p_from_raw_counts=true"]
    assert cli_run(["tx", "train", *_train_args(synth, tmp_path, "raw", *raw, steps=1),
                    "+model.kwargs.counts_target_sum=0"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "counts_target_sum must be positive" in err[0] and not (tmp_path / "raw").exists()
    assert cli_run(["tx", "train", *_train_args(synth, tmp_path, "raw", *raw, steps=1)]) == 0
    hparams = safe_torch_load(tmp_path / "raw" / "checkpoints" / "final.ckpt")["hyper_parameters"]
    assert hparams["log1p_from_raw_counts"] is True and hparams["counts_target_sum"] == 10000.0
    assert cli_run(["tx", "predict", "--output-dir", str(tmp_path / "raw"), "--checkpoint", "final.ckpt",
                    "--predict-only"]) == 0


def test_num_nodes_reaches_the_trainer(tmp_path):
    """Multi-node runs: `+training.num_nodes=N` is handed to Lightning (which reads the usual env vars)."""
    from state.tx.train.run import _trainer

    cfg = compose_tx_config(["+training.num_nodes=2", "training.strategy=ddp"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    trainer = _trainer(plain, tmp_path, max_steps=1, loggers=[], model_name="state", strategy="ddp")
    assert trainer.num_nodes == 2


def test_train_uses_arc_state_matmul_precision_and_restores_it(synth, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("state.tx.train.run._train", lambda cfg: seen.append(torch.get_float32_matmul_precision()))
    before = torch.get_float32_matmul_precision()
    train(compose_tx_config(_train_args(synth, tmp_path, "prec", *TINY_STATE)))
    assert seen == ["medium"] and torch.get_float32_matmul_precision() == before


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("bf16-mixed", True)])
def test_adam_is_fused_unless_a_grad_scaler_must_unscale_for_clipping(synth, tmp_path, precision, fused):
    """16-mixed's GradScaler must unscale before clipping, which a fused step does not allow; bf16-mixed
    has no scaler and clips a fused optimizer's gradients as 32-true does (16-mixed, which Lightning
    turns into bf16-mixed on CPU: tests/unit/test_optimizer_choice.py)."""
    args = _train_args(synth, tmp_path, f"prec_{precision}", *TINY_STATE, steps=2)
    result = train(compose_tx_config([*args, f"training.precision={precision}", "training.gradient_clip_val=1.0"]))
    assert result.global_step == 2
    ckpt = safe_torch_load(result.checkpoint_paths["final.ckpt"])
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is fused


def test_a_full_precision_run_resumes_under_mixed_precision(synth, tmp_path):
    first = train(compose_tx_config(_train_args(synth, tmp_path, "mix", *TINY_STATE, steps=2)))
    assert safe_torch_load(first.checkpoint_paths["last.ckpt"])["optimizer_states"][0]["param_groups"][0]["fused"]
    more = ["training.precision=bf16-mixed", "training.gradient_clip_val=1.0"]
    resumed = train(compose_tx_config([*_train_args(synth, tmp_path, "mix", *TINY_STATE, steps=4), *more]))
    assert resumed.resumed_from is not None and resumed.global_step == 4


@pytest.mark.parametrize("extra", [[], ["model.kwargs.lora.enable=true"], ["model.kwargs.batch_encoder=true",
                                                                             "model.kwargs.confidence_token=true"]])
def test_inference_rebuild_matches_the_trained_lightning_module(synth, tmp_path, extra):
    """``infer``'s Lightning-free rebuild of a run we trained (LoRA, batch encoder, confidence token
    included) predicts what the LightningModule predicts, one set at a time."""
    from state.tx.infer.net import TransitionInferenceModel
    from state.tx.infer.predictor import load_predictor
    from state.tx.models.registry import load_model_checkpoint

    result = train(compose_tx_config(_train_args(synth, tmp_path, "lean", *TINY_STATE, *extra, steps=2)))
    predictor = load_predictor(result.run_dir)
    assert isinstance(predictor.module, TransitionInferenceModel)
    module = load_model_checkpoint(result.checkpoint_paths["final.ckpt"])
    rng = np.random.default_rng(0)
    ctrl = rng.gamma(1.0, 1.0, size=(3, 8, predictor.input_dim)).astype(np.float32)
    vec = predictor.pert_vector(predictor.pert_names[1])
    pert = np.broadcast_to(vec, (3, 8, vec.size)).astype(np.float32)
    batch = rng.integers(0, len(predictor.batch_map or [0]), size=(3, 8)) if predictor.uses_batch else None
    with torch.inference_mode():
        got, got_counts = predictor.predict_sets(ctrl=ctrl, pert=pert, batch=batch, pert_names=["p"] * 3)
        for i in range(3):
            item = {"ctrl_cell_emb": torch.from_numpy(ctrl[i]), "pert_emb": torch.from_numpy(pert[i])}
            if batch is not None:
                item["batch"] = torch.from_numpy(batch[i])
            out = module.predict_step(item, 0, padded=False)
            np.testing.assert_allclose(got[i], out["preds"].numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(got_counts[i], out["pert_cell_counts_preds"].numpy(), rtol=0, atol=1e-6)


def test_n_positions_override_sets_the_data_and_the_model_set_length(synth, tmp_path, monkeypatch):
    """The override train's own hint suggests: the loader yields sets of N cells, the model reshapes
    batches into sets of N and its backbone has N + extra_tokens positions (saved and reloaded)."""
    from state.tx.infer.predictor import load_predictor
    from state.tx.models.state_transition import StateTransitionPerturbationModel

    set_shapes = []
    original = StateTransitionPerturbationModel._sets

    def recording_sets(self, batch, *, padded):
        sets = original(self, batch, padded=padded)
        set_shapes.append(tuple(sets[0].shape[:2]))
        return sets

    monkeypatch.setattr(StateTransitionPerturbationModel, "_sets", recording_sets)
    override = ["+model.kwargs.transformer_backbone_kwargs.n_positions=6", "+model.kwargs.extra_tokens=1"]
    result = train(compose_tx_config(_train_args(synth, tmp_path, "npos", *TINY_STATE, *override, steps=2)))
    assert safe_torch_load(result.run_dir / "data_module.torch")["cell_sentence_len"] == 6
    assert set_shapes and {cells for _, cells in set_shapes} == {6}  # TINY_STATE's cell_set_len=8 lost
    assert {sets for sets, _ in set_shapes} <= {1, 2}  # training.batch_size=2 sets per batch
    hparams = safe_torch_load(result.checkpoint_paths["final.ckpt"])["hyper_parameters"]
    assert hparams["cell_set_len"] == 6 and hparams["transformer_backbone_kwargs"]["n_positions"] == 7
    predictor = load_predictor(result.run_dir)
    assert predictor.cell_set_len == 6
    assert predictor.module.transformer_backbone.config.n_positions == 7
