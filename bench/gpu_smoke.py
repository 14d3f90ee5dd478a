"""GPU smoke test: what one GPU does with this project, in one report (run through bench/gpu_smoke.sh).

    bash bench/gpu_smoke.sh [--dry-run] [--report PATH] [--work DIR] [--budget-s S]

Sections (each writes its part of the report as soon as it is done, so a run cut short still reports):

* ``environment``: torch / CUDA / card, bf16 support;
* ``attention``: the SDPA kernel the State backbone's attention actually runs (flash, memory-efficient,
  cudnn or math, read from the profiler's aten op) for the head size, heads and set length of every
  ``configs/model/state*.yaml``, in float32 and under bf16 autocast, the backends that accept that
  shape at all, and forward + backward time of one layer;
* ``loss``: the energy loss on log1p expression (2,000 genes) in fp32, tf32 and bf16 autocast, guarded
  (``SetLoss``) and unguarded (geomloss as is), relative error against float64 and forward + backward time;
* ``loader``: the fast set loader (layout written by ``state tx index``) in cells/s with 0/4/8 workers,
  and whether batches arrive in pinned memory;
* ``e2e``: ``state tx train model=state_sm`` steps/s, data-wait fraction (time between one step's end
  and the next step's start: fetching the batch and its copy to the device) and GPU utilisation, for
  32-true and bf16-mixed at two batch sizes;
* ``sync``: host-device synchronisations inside training steps (``torch.cuda.set_sync_debug_mode``),
  grouped by call site;
* ``sigterm``: SIGTERM to the process group of a training run with loader workers: exit code, time to
  exit, whether ``last.ckpt`` was written;
* ``emb_transform``: ``state emb transform`` cells/s with a randomly initialised SE-600M-shaped model
  (d_model 2048, 16 layers, 2,048-gene sentences, 5,120-wide gene vectors).

``--dry-run`` runs every section on CPU with tiny sizes (a test runs it, so the script cannot rot).
Every CUDA call is guarded: without a GPU the CUDA-only parts say so in the report.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

SECTIONS = ("environment", "attention", "loss", "loader", "e2e", "sync", "sigterm", "emb_transform")
DATA_KW = {"embed_key": "X_hvg", "output_space": "gene", "control_pert": "non-targeting", "pert_col": "gene",
           "cell_type_key": "cell_type", "batch_col": "gem_group", "barcode": True}
KERNELS = {  # aten op of scaled_dot_product_attention -> kernel
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (other device)",
    "aten::_scaled_dot_product_attention_math": "math",
}


@dataclass
class Sizes:
    """What each section runs; ``dry`` shrinks everything to seconds on a CPU."""

    dry: bool
    attn_batch: int = 16
    attn_max_len: int = 100_000
    attn_models: tuple[str, ...] | None = None  # None: every configs/model/state*.yaml
    repeats: int = 3
    loss_sets: int = 16
    loss_lens: tuple[int, ...] = (128, 512)
    loss_genes: int = 2000
    loader_cells: int = 100_000
    loader_set_len: int = 128
    loader_batch: int = 16
    loader_workers: tuple[int, ...] = (0, 4, 8)
    loader_batches: int = 40
    e2e_batches: tuple[int, ...] = (16, 64)
    e2e_steps: int = 40
    e2e_warmup: int = 10
    e2e_workers: int = 8
    e2e_model: list[str] = field(default_factory=lambda: ["model=state_sm"])
    sync_steps: int = 12
    sigterm_workers: int = 4
    se_shape: dict = field(default_factory=lambda: {"token_dim": 5120, "d_model": 2048, "nhead": 16, "d_hid": 2048,
                                                    "nlayers": 16, "output_dim": 2048, "num_datasets": 14420})
    se_pad_length: int = 2048
    se_vocab: int = 19790
    se_cells: int = 1024
    se_batch: int = 32

    @classmethod
    def for_run(cls, dry: bool) -> Sizes:
        if not dry:
            return cls(dry=False)
        tiny_model = ["model=state_sm", "model.kwargs.cell_set_len=16", "model.kwargs.hidden_dim=32",
                      "model.kwargs.transformer_backbone_kwargs.intermediate_size=64",
                      "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=1",
                      "model.kwargs.transformer_backbone_kwargs.num_attention_heads=2",
                      "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=2",
                      "model.kwargs.transformer_backbone_kwargs.head_dim=16",
                      "+model.kwargs.decoder_hidden_dims=[32]"]
        return cls(dry=True, attn_batch=1, attn_max_len=16, attn_models=("state_sm", "state_tiny"), repeats=1,
                   loss_sets=1, loss_lens=(16, 32), loss_genes=200,
                   loader_cells=3000, loader_set_len=16, loader_batch=2, loader_workers=(0, 2), loader_batches=3,
                   e2e_batches=(2,), e2e_steps=3, e2e_warmup=1, e2e_workers=1, e2e_model=tiny_model,
                   sync_steps=2, sigterm_workers=2,
                   se_shape={"token_dim": 16, "d_model": 32, "nhead": 4, "d_hid": 32, "nlayers": 1,
                             "output_dim": 16, "num_datasets": 3},
                   se_pad_length=32, se_vocab=300, se_cells=32, se_batch=8)


# ---------------------------------------------------------------------------------------------- helpers


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def timed(fn, *, repeats: int) -> tuple[object, float]:
    """(last result, median seconds) of ``fn()`` after one warm-up call, synchronising CUDA around each."""
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2]


class GpuSampler:
    """GPU utilisation (%) sampled in a thread: torch.cuda.utilization (pynvml) or nvidia-smi; None on CPU."""

    def __init__(self, period_s: float = 0.25) -> None:
        self.period_s, self.samples, self._stop = period_s, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.source = self._pick()

    @staticmethod
    def _pick() -> str | None:
        if not cuda():
            return None
        import torch

        try:
            torch.cuda.utilization()
            return "torch.cuda.utilization"
        except Exception:  # noqa: BLE001 - pynvml missing or no NVML: try the command line tool
            pass
        try:
            subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=True, timeout=10)
            return "nvidia-smi"
        except (OSError, subprocess.SubprocessError):
            return None

    def _read(self) -> float | None:
        if self.source == "torch.cuda.utilization":
            import torch

            return float(torch.cuda.utilization())
        proc = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                               "-i", os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]],
                              capture_output=True, text=True, timeout=10)
        return float(proc.stdout.strip().splitlines()[0])

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(Exception):
                self.samples.append(self._read())

    def __enter__(self) -> GpuSampler:
        if self.source:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)

    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


# ---------------------------------------------------------------------------------------------- sections


def environment(sizes: Sizes, work: Path) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "dry_run": sizes.dry,
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update({"device": torch.cuda.get_device_name(0), "capability": f"{props.major}.{props.minor}",
                     "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                     "bf16_supported": torch.cuda.is_bf16_supported(), "device_count": torch.cuda.device_count()})
    else:
        info["device"] = "cpu"
    return info


def _state_backbones() -> list[dict]:
    """Name, heads, kv heads, head_dim and set length of every configs/model/state*.yaml (llama backbones)."""
    from omegaconf import OmegaConf

    from state.config_paths import configs_dir
    from state.tx.config.compose import compose_tx_config

    shapes = []
    for path in sorted((configs_dir() / "model").glob("state*.yaml")):
        cfg = compose_tx_config([f"model={path.stem}"])
        kw = cfg.model.kwargs
        if kw.get("transformer_backbone_key") != "llama":
            continue
        bb = OmegaConf.to_container(kw.transformer_backbone_kwargs, resolve=True)
        shapes.append({"model": path.stem, "heads": int(bb["num_attention_heads"]),
                       "kv_heads": int(bb.get("num_key_value_heads") or bb["num_attention_heads"]),
                       "head_dim": int(bb.get("head_dim") or bb["hidden_size"] // bb["num_attention_heads"]),
                       "hidden": int(bb["hidden_size"]), "set_len": int(kw.cell_set_len), "backbone": bb})
    return shapes


def _kernel_of(run) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
        synchronize()
    names = {e.key for e in prof.key_averages()}
    found = [kernel for op, kernel in KERNELS.items() if op in names]
    return ", ".join(found) if found else "none seen"


def _accepted_backends(q, k, v) -> list[str]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ok = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with warnings.catch_warnings(), sdpa_kernel([backend]):
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, k, v)
            ok.append(name.lower().replace("_attention", ""))
        except RuntimeError:
            pass
    return ok


def attention(sizes: Sizes, work: Path) -> dict:
    """One layer of the real backbone (state.tx.nn.backbones) per shipped shape; its MLP is shrunk (irrelevant)."""
    import torch

    dev = device()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # as `tx train` sets it (STATE_MATMUL_PRECISION)
    try:
        rows = _attention_rows(sizes, dev)
    finally:
        torch.set_float32_matmul_precision(previous)
    return {"rows": rows, "note": "on CPU the backbone picks the math kernel itself under medium precision"}


def _attention_rows(sizes: Sizes, dev) -> list[dict]:
    import torch

    from state.tx.nn.backbones import build_backbone

    rows = []
    for shape in _state_backbones():
        if sizes.attn_models is not None and shape["model"] not in sizes.attn_models:
            continue
        bb = {**shape["backbone"], "num_hidden_layers": 1, "intermediate_size": 64}
        layer = build_backbone("llama", bb).to(dev).train()
        seq = min(shape["set_len"], sizes.attn_max_len)
        x = torch.randn(sizes.attn_batch, seq, shape["hidden"], device=dev, requires_grad=True)
        q = torch.randn(sizes.attn_batch, shape["heads"], seq, shape["head_dim"], device=dev)
        for precision in ("fp32", "bf16-autocast"):
            ctx = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision != "fp32"
                   else contextlib.nullcontext())

            def step(layer=layer, x=x, ctx=ctx):
                with ctx:
                    out = layer(inputs_embeds=x).last_hidden_state
                out.float().sum().backward()

            kernel = _kernel_of(step)
            _, seconds = timed(step, repeats=sizes.repeats)
            qq = q.to(torch.bfloat16) if precision != "fp32" else q
            rows.append({"model": shape["model"], "head_dim": shape["head_dim"], "heads": shape["heads"],
                         "set_len": seq, "batch": sizes.attn_batch, "precision": precision, "kernel": kernel,
                         "backends_accepting_shape": _accepted_backends(qq, qq, qq),
                         "fwd_bwd_ms_one_layer": round(seconds * 1e3, 3)})
        del layer
    return rows


def _expression(n_sets: int, n_cells: int, n_genes: int, seed: int):
    """Two groups of sets of log1p(CP10k) Poisson counts, the second with more expression on some genes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    gene_mean = torch.exp(torch.randn(n_genes, generator=g) * 1.5 - 1.0)

    def draw(effect):
        library = torch.exp(torch.randn(n_sets, n_cells, 1, generator=g) * 0.3)
        counts = torch.poisson((gene_mean * effect * library).contiguous(), generator=g)
        return torch.log1p(counts / counts.sum(-1, keepdim=True).clamp(min=1) * 1e4)

    return draw(torch.ones(n_genes)), draw(1 + 0.2 * torch.rand(n_genes, generator=g))


def loss(sizes: Sizes, work: Path) -> dict:
    import torch
    from geomloss import SamplesLoss

    from state.tx.nn.losses import SetLoss

    dev = device()
    rows = []
    previous = torch.get_float32_matmul_precision()
    try:
        for n_cells in sizes.loss_lens:
            pred, target = _expression(sizes.loss_sets, n_cells, sizes.loss_genes, seed=n_cells)
            reference = SamplesLoss("energy")(pred.double(), target.double())  # [B] on CPU, float64
            pred, target = pred.to(dev), target.to(dev)
            for mode, matmul, autocast in (("fp32", "highest", False), ("tf32", "high", False),
                                           ("bf16", "highest", True)):
                torch.set_float32_matmul_precision(matmul)
                for path, fn in (("guarded", SetLoss("energy")), ("unguarded", SamplesLoss("energy"))):
                    p = pred.clone().requires_grad_(True)

                    def step(fn=fn, p=p, target=target, autocast=autocast):
                        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                        with ctx:
                            value = fn(p, target)
                        value.sum().backward()
                        return value.detach()

                    value, seconds = timed(step, repeats=sizes.repeats)
                    rel = ((value.double().cpu() - reference) / reference).abs().max().item()
                    rows.append({"set_len": n_cells, "sets": sizes.loss_sets, "genes": sizes.loss_genes,
                                 "mode": mode, "loss": path, "value_mean": round(value.double().mean().item(), 6),
                                 "float64_mean": round(reference.mean().item(), 6), "max_rel_error": float(f"{rel:.3g}"),
                                 "fwd_bwd_ms": round(seconds * 1e3, 3)})
    finally:
        torch.set_float32_matmul_precision(previous)
    return {"rows": rows, "note": "tf32 on CPU is float32 unless the CPU has bf16 matmul units"}


def _dataset(sizes: Sizes, work: Path) -> tuple[Path, float]:
    """Loader benchmark files (bench/loader_data.py) + the layout of `state tx index`; seconds to index.
    Written once per run (cached): the loader, e2e, sync and sigterm sections share them."""
    return _dataset_of(sizes.loader_cells, work)


@functools.cache
def _dataset_of(n_cells: int, work: Path) -> tuple[Path, float]:
    from loader_data import write_dataset, write_toml

    folder = write_dataset(work / f"loader_{n_cells}", n_cells)
    toml = write_toml(work / f"loader_{n_cells}.toml", folder)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "state", "tx", "index", "--toml", str(toml), "--keys", "X_hvg"],
                          capture_output=True, text=True, env=_child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"state tx index failed: {proc.stderr.strip()[-500:]}")
    return toml, time.perf_counter() - start


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT / "src") + os.pathsep +
                env.get("PYTHONPATH", "")})
    return env


def loader(sizes: Sizes, work: Path) -> dict:
    from state.tx.data.module import build_data_module, setup_data_module

    toml, index_s = _dataset(sizes, work)
    rows = []
    for workers in sizes.loader_workers:
        kw = {**DATA_KW, "toml_config_path": str(toml), "num_workers": workers, "fast_loader": True,
              "pin_memory": True}
        dm = build_data_module("PerturbationDataModule", kw, batch_size=sizes.loader_batch,
                               cell_sentence_len=sizes.loader_set_len)
        setup_data_module(dm)
        it = iter(dm.train_dataloader())
        first = next(it)
        pinned = bool(first["pert_cell_emb"].is_pinned())
        for _ in range(2):
            next(it)
        cells, start = 0, time.perf_counter()
        for _ in range(sizes.loader_batches):
            cells += next(it)["pert_cell_emb"].shape[0]
        seconds = time.perf_counter() - start
        rows.append({"workers": workers, "cells_per_s": round(cells / seconds), "batches": sizes.loader_batches,
                     "cells_per_batch": cells // sizes.loader_batches, "pinned": pinned})
        del it, dm
    return {"cells": sizes.loader_cells, "index_seconds": round(index_s, 1), "rows": rows}


class _Interrupted(BaseException):
    """SIGTERM (bench/gpu_smoke.sh's time limit): write what there is and stop; children are killed on the way."""


def _on_sigterm(signum, frame) -> None:
    raise _Interrupted


class StepClock:
    """Lightning callback: step timestamps, data wait between steps, optional sync-debug window."""

    def __init__(self, warmup: int, *, total: int | None = None, sync_from: int | None = None,
                 marker: Path | None = None, sample_gpu: bool = False) -> None:
        from lightning.pytorch import Callback

        clock = self

        class _Callback(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                clock.batch_start(trainer.global_step)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                clock.batch_end(trainer.global_step)

            def on_train_end(self, trainer, pl_module):
                clock.stop_sync_debug()

        self.callback = _Callback()
        self.warmup, self.total, self.sync_from, self.marker = warmup, total, sync_from, marker
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.waits: list[float] = []
        self.sites: Counter = Counter()
        self._sync_on = False
        self._show = None
        self.gpu = GpuSampler() if sample_gpu else None

    def batch_start(self, step: int) -> None:
        now = time.perf_counter()
        if self.ends and len(self.starts) > self.warmup:  # gaps inside the measured window only
            self.waits.append(now - self.ends[-1])
        self.starts.append(now)
        if self.gpu is not None and len(self.starts) == self.warmup + 1:
            self.gpu.__enter__()  # utilisation over the measured steps only
        if self.sync_from is not None and step == self.sync_from:
            self.start_sync_debug()
        if self.marker is not None and step == 2:
            self.marker.write_text("training\n")

    def batch_end(self, step: int) -> None:
        if self.total is not None and len(self.ends) + 1 == self.total:
            synchronize()  # the last step: wait for the GPU, so the wall time covers its work
            if self.gpu is not None:
                self.gpu.__exit__(None, None, None)
        self.ends.append(time.perf_counter())

    def summary(self) -> dict:
        """Over the steps after the warm-up, up to the end of the last step (not the run's teardown)."""
        if self.gpu is not None:
            self.gpu.__exit__(None, None, None)
        measured = self.starts[self.warmup:]
        if len(measured) < 2 or len(self.ends) < len(self.starts):
            return {"steps": len(self.starts)}
        wall = self.ends[-1] - measured[0]
        gpu = {"gpu_util_mean_pct": self.gpu.mean(), "gpu_util_source": self.gpu.source} if self.gpu else {}
        return {"steps_measured": len(measured), "steps_per_s": round(len(measured) / wall, 3),
                "data_wait_fraction": round(sum(self.waits) / wall, 3), **gpu}

    # --- torch.cuda.set_sync_debug_mode("warn"): every synchronising call warns; record where from
    def start_sync_debug(self) -> None:
        import torch

        if not torch.cuda.is_available() or self._sync_on:
            return
        self._show = warnings.showwarning
        warnings.filterwarnings("always", message=".*synchroniz.*")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        self._sync_on = True

    def stop_sync_debug(self) -> None:
        import torch

        if not self._sync_on:
            return
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._show
        self._sync_on = False

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            self._show(message, category, filename, lineno, file, line)
            return
        stack = traceback.extract_stack()[:-1]
        ours = next((f for f in reversed(stack) if f"{os.sep}state{os.sep}" in f.filename
                     and "site-packages" not in f.filename), None)
        site = f"{filename}:{lineno}"
        where = f"{ours.filename.split(os.sep + 'src' + os.sep)[-1]}:{ours.lineno} ({ours.name})" if ours else "-"
        self.sites[(site, where)] += 1


def _train_in_process(overrides: list[str], clock: StepClock, *, child: bool = False) -> int:
    """`state tx train` in this process with ``clock``'s callback added to the Trainer; its exit code.
    In the report process a run stopped by SIGTERM (the script's time limit) stops the script too."""
    import state.training.trainer as trainer_mod
    from state.__main__ import main as state_main

    original = trainer_mod._layer_callbacks

    def with_clock(setup, *, show_bar):
        return [*original(setup, show_bar=show_bar), clock.callback]

    trainer_mod._layer_callbacks = with_clock
    try:
        code = state_main(["tx", "train", *overrides])
    finally:
        trainer_mod._layer_callbacks = original
    if code == 128 + signal.SIGTERM and not child:
        raise _Interrupted  # the run took our SIGTERM (its preemption handler) and stopped: so do we
    return code


def _train_overrides(sizes: Sizes, toml: Path, work: Path, *, name: str, precision: str, batch: int, steps: int,
                     workers: int) -> list[str]:
    data = {**DATA_KW, "toml_config_path": str(toml), "num_workers": workers, "fast_loader": "true",
            "pin_memory": "true"}
    return [*sizes.e2e_model, *(f"data.kwargs.{k}={v}" for k, v in data.items()),
            f"training.precision={precision}", f"training.batch_size={batch}", f"training.max_steps={steps}",
            "training.val_freq=1000000", "use_wandb=false", f"output_dir={work / 'runs'}", f"name={name}",
            "overwrite=true"]


def _free_cuda_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def e2e(sizes: Sizes, work: Path) -> dict:
    toml, _ = _dataset(sizes, work)
    rows = []
    precisions = ("32-true", "bf16-mixed")
    for batch in sizes.e2e_batches:
        for precision in precisions:
            clock = StepClock(sizes.e2e_warmup, total=sizes.e2e_warmup + sizes.e2e_steps, sample_gpu=True)
            overrides = _train_overrides(sizes, toml, work, name=f"e2e_{precision}_{batch}", precision=precision,
                                         batch=batch, steps=sizes.e2e_warmup + sizes.e2e_steps,
                                         workers=sizes.e2e_workers)
            code = _train_in_process(overrides, clock)
            rows.append({"precision": precision, "batch_sets": batch, "exit": code, **clock.summary()})
            _free_cuda_memory()
    return {"model": " ".join(sizes.e2e_model[:1]), "workers": sizes.e2e_workers, "rows": rows}


def sync(sizes: Sizes, work: Path) -> dict:
    toml, _ = _dataset(sizes, work)
    clock = StepClock(0, sync_from=3)
    precision = "bf16-mixed" if cuda() else "32-true"  # nothing to find on CPU: the cheaper run
    overrides = _train_overrides(sizes, toml, work, name="sync", precision=precision, batch=sizes.e2e_batches[0],
                                 steps=3 + sizes.sync_steps, workers=sizes.e2e_workers)
    code = _train_in_process(overrides, clock)
    sites = [{"op_site": site, "state_frame": where, "count": n} for (site, where), n in clock.sites.most_common()]
    result = {"exit": code, "steps_checked": sizes.sync_steps, "sites": sites,
              "limits": "syncs raised on the autograd engine's thread (backward) reach stderr, not this table"}
    if not cuda():
        result["note"] = "no CUDA device: the run went through, sync sites need torch.cuda.set_sync_debug_mode"
    return result


def sigterm(sizes: Sizes, work: Path) -> dict:
    """A training run with workers in its own process group; SIGTERM to the group once it trains."""
    toml, _ = _dataset(sizes, work)
    marker = work / "sigterm.training"
    marker.unlink(missing_ok=True)
    overrides = _train_overrides(sizes, toml, work, name="sigterm", precision="bf16-mixed" if cuda() else "32-true",
                                 batch=sizes.e2e_batches[0], steps=1_000_000, workers=sizes.sigterm_workers)
    log = work / "sigterm.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, __file__, "--train-child", str(marker), *overrides], stdout=sink,
                                stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is not None:
                raise RuntimeError(f"training ended before the signal (exit {proc.returncode}); see {log}")
            members = _group_members(proc.pid)
            sent = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=180)
                hung = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code, hung = proc.wait(), True
            seconds = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    last = work / "runs" / "sigterm" / "checkpoints" / "last.ckpt"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"workers": sizes.sigterm_workers, "processes_in_group": members, "exit_code": code,
            "expected_exit_code": 128 + signal.SIGTERM, "hung_killed": hung, "seconds_to_exit": round(seconds, 1),
            "last_ckpt": last.is_file(), "log_tail": tail}


def _group_members(sid: int) -> int:
    proc = subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True)
    return len(proc.stdout.split())


def _se_model(sizes: Sizes, work: Path) -> tuple[Path, list[str]]:
    """A randomly initialised SE checkpoint of the given shape (bf16 weights: what CUDA inference uses)."""
    import torch
    from omegaconf import OmegaConf

    from state.emb.nn.model import SEArchitecture, StateEmbeddingNet

    folder = work / f"se_{sizes.se_shape['d_model']}x{sizes.se_shape['nlayers']}"
    genes = [f"GENE{i:05d}" for i in range(sizes.se_vocab)]
    if (folder / "model.ckpt").is_file():
        return folder, genes
    folder.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(ROOT / "tests" / "data" / "fixtures" / "emb" / "se_tiny" / "config.yaml")
    shape = sizes.se_shape
    cfg.model.update({"emsize": shape["d_model"], "d_hid": shape["d_hid"], "nhead": shape["nhead"],
                      "nlayers": shape["nlayers"], "output_dim": shape["output_dim"], "batch_size": sizes.se_batch,
                      "dropout": 0.0})
    cfg.dataset.pad_length = sizes.se_pad_length
    cfg.dataset.P = cfg.dataset.N = cfg.dataset.S = min(512, sizes.se_pad_length // 4)
    cfg.dataset[cfg.dataset.current].num_datasets = shape["num_datasets"]
    cfg.embeddings[cfg.embeddings.current].size = shape["token_dim"]
    cfg.embeddings[cfg.embeddings.current].num = sizes.se_vocab
    torch.manual_seed(0)
    net = StateEmbeddingNet(SEArchitecture(**shape))
    state_dict = {k: v.to(torch.bfloat16) for k, v in net.state_dict().items() if not k.startswith("pe_embedding")}
    table = torch.randn(sizes.se_vocab, shape["token_dim"], dtype=torch.bfloat16)
    torch.save({"state_dict": state_dict, "hyper_parameters": {"nhead": shape["nhead"]},
                "cfg_yaml": OmegaConf.to_yaml(cfg), "protein_embeds_dict": dict(zip(genes, table, strict=True))},
               folder / "model.ckpt")
    return folder, genes


def _se_input(path: Path, genes: list[str], n_cells: int) -> Path:
    """Raw counts over the model's genes, ~2,500 expressed per cell (more than a 2,048-gene sentence holds)."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    density = min(0.6, 2500 / len(genes))
    x = sp.random(n_cells, len(genes), density=density, format="csr", random_state=rng, dtype=np.float32)
    x.data = rng.geometric(0.3, x.nnz).astype(np.float32)
    ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
               var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def emb_transform(sizes: Sizes, work: Path) -> dict:
    from state.emb.checkpoint import load_se_model
    from state.emb.transform import transform

    start = time.perf_counter()
    folder, genes = _se_model(sizes, work)
    build_s = time.perf_counter() - start
    h5ad = _se_input(work / f"se_input_{sizes.se_cells}.h5ad", genes, sizes.se_cells)
    start = time.perf_counter()
    loaded = load_se_model(model_folder=folder)
    load_s = time.perf_counter() - start
    dtype = str(next(loaded.model.parameters()).dtype)
    del loaded
    synchronize()
    out = work / "se_out.npy"
    start = time.perf_counter()
    result = transform(h5ad, output=out, model_folder=folder, batch_size=sizes.se_batch)
    synchronize()
    total_s = time.perf_counter() - start
    embed_s = max(total_s - load_s, 1e-9)
    return {"shape": sizes.se_shape, "pad_length": sizes.se_pad_length, "vocab": sizes.se_vocab,
            "cells": result.n_cells, "width": result.width, "batch_size": sizes.se_batch, "weights_dtype": dtype,
            "build_and_save_s": round(build_s, 1), "load_s": round(load_s, 1), "transform_wall_s": round(total_s, 1),
            "cells_per_s_excluding_load": round(result.n_cells / embed_s, 1)}


RUNNERS = {"environment": environment, "attention": attention, "loss": loss, "loader": loader, "e2e": e2e,
           "sync": sync, "sigterm": sigterm, "emb_transform": emb_transform}


# ---------------------------------------------------------------------------------------------- report


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return lines


def render(results: dict, header: dict) -> str:
    lines = ["# GPU smoke report", "", f"`{header['command']}` on {header['device']}, {header['started']}", ""]
    for name in SECTIONS:
        if name not in results:
            continue
        result = dict(results[name])
        lines += [f"## {name}", "", f"{result.pop('seconds', 0):.1f} s wall, {result.pop('cpu_seconds', 0):.1f} s CPU", ""]
        for key in ("error", "skipped"):
            if key in result:
                lines += [f"**{key}**: {result.pop(key)}", ""]
        for key, value in result.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                lines += [f"{key}:", "", *_table(value), ""]
            else:
                lines.append(f"- {key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
        lines.append("")
    lines += ["## raw", "", "```json", json.dumps({"header": header, "results": results}, indent=1, default=str),
              "```", ""]
    return "\n".join(lines)


def write_report(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        fh.write(text)
    Path(fh.name).replace(path)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers, the sigterm run)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(args) -> int:
    import torch

    sizes = Sizes.for_run(args.dry_run)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device; use --dry-run to exercise the script on CPU", file=sys.stderr)
        return 2
    header = {"command": " ".join(["bench/gpu_smoke.sh", *sys.argv[1:]]),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    results: dict = {}
    began = time.monotonic()
    failed = False
    signal.signal(signal.SIGTERM, _on_sigterm)
    only = args.sections or list(SECTIONS)
    for name in SECTIONS:
        if name not in only:
            continue
        if time.monotonic() - began > args.budget_s:
            results[name] = {"skipped": f"time budget of {args.budget_s} s used up", "seconds": 0.0}
        else:
            start, cpu = time.monotonic(), _cpu_seconds()
            print(f"gpu_smoke: {name} ...", file=sys.stderr, flush=True)
            try:
                results[name] = RUNNERS[name](sizes, work)
            except _Interrupted:
                results[name] = {"error": "interrupted by SIGTERM (time limit)", "seconds": time.monotonic() - start}
                write_report(Path(args.report), render(results, header))
                print(f"gpu_smoke: interrupted during {name}; report {args.report}", file=sys.stderr)
                return 124
            except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
                failed = True
                results[name] = {"error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc().strip().splitlines()[-6:]}
            results[name]["seconds"] = round(time.monotonic() - start, 1)
            results[name]["cpu_seconds"] = round(_cpu_seconds() - cpu, 1)
        write_report(Path(args.report), render(results, header))
    print(f"gpu_smoke: report {args.report} ({time.monotonic() - began:.0f} s)", file=sys.stderr)
    return 1 if failed else 0


def train_child(marker: str, overrides: list[str]) -> int:
    """Child of the sigterm section: train, writing ``marker`` once step 2 starts."""
    clock = StepClock(0, marker=Path(marker))
    return _train_in_process(overrides, clock, child=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--train-child":
        return train_child(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", required=True, help="the report file (markdown, raw JSON at its end)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "_work" / "gpu_smoke"),
                        help="generated data, checkpoints and runs (not the report)")
    parser.add_argument("--dry-run", action="store_true", help="every section on CPU, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=470.0,
                        help="sections starting after this many seconds are skipped (the report says so)")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, help="run only these sections")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
