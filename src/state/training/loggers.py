"""Metric loggers: a CSV file always, W&B when asked for and usable.

W&B problems never stop training. Disabled (``WANDB_MODE=disabled``), not logged in, or failing
to start: one warning line, and the run goes on with its CSV metrics. Failing later (network
loss mid-run): one warning line, and W&B logging stops while training continues.
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger

from state.utils.errors import first_line

log = logging.getLogger(__name__)


class RunCSVLogger(CSVLogger):
    """``version_0/metrics.csv`` + ``hparams.yaml``; on resume, rows logged before the resumed step are kept.

    Lightning's CSV writer deletes an existing metrics.csv; arc-state's runs lose their history on
    resume that way. New metric columns are merged by Lightning (the file is rewritten with the union).
    """

    def __init__(self, save_dir: str | Path, name: str, *, keep_rows_before_step: int | None = None) -> None:
        super().__init__(save_dir=str(save_dir), name=name, version=0)
        self._keep_before = keep_rows_before_step

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        kept: list[dict[str, Any]] = []
        header: list[str] = []
        path = Path(self.log_dir) / "metrics.csv"
        if self._keep_before is not None and path.is_file():
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                header = list(reader.fieldnames or [])
                kept = [row for row in reader if _row_step(row) < self._keep_before]
        with warnings.catch_warnings():
            # Lightning warns that it will delete metrics.csv; the rows we keep are written back.
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = super().experiment
        if kept:
            writer.metrics = kept + writer.metrics
            writer.metrics_keys = sorted(set(header) | set(writer.metrics_keys))
        return writer


def _row_step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


def _wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return auth is not None


def _wandb_unusable(switch: str, csv_file: str) -> str | None:
    """Why W&B cannot be used in this environment (a warning line), or None when it can."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return f"{switch}=true but WANDB_MODE=disabled: logging to {csv_file} only"
    if mode not in ("offline", "dryrun") and not _wandb_credentials_present():
        return (f"{switch}=true but W&B is not logged in (no WANDB_API_KEY or ~/.netrc entry): logging to "
                f"{csv_file} only (run `wandb login`, set WANDB_MODE=offline, or {switch}=false)")
    return None


def make_wandb_logger(*, run_name: str, project: str, entity: str | None = None,
                      save_dir: str | Path | None = None, tags: Sequence[str] | None = None,
                      config: Mapping[str, Any] | None = None, run_dir: Path | None = None,
                      switch: str = "wandb", csv_file: str = "the CSV metrics file"):
    """A W&B logger, or None (with one warning line) when W&B is disabled, not logged in or fails to start.

    ``config`` is recorded as the W&B run's config; with ``run_dir``, the run's W&B path is written to
    ``run_dir/wandb_path.txt``. ``switch`` (the config key that turned W&B on) and ``csv_file`` (where
    metrics go regardless) only word the warnings.
    """
    problem = _wandb_unusable(switch, csv_file)
    if problem is not None:
        log.warning(problem)
        return None
    try:
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        logger = _SafeWandbLogger(name=run_name, project=project, entity=entity,
                                  dir=None if save_dir is None else str(save_dir),
                                  tags=None if tags is None else list(tags))
        experiment = logger.experiment  # start the run now, so that a failure is caught here
        if config is not None:
            experiment.config.update(dict(config), allow_val_change=True)
        run_path = getattr(experiment, "path", None)
        if run_dir is not None and run_path:
            (run_dir / "wandb_path.txt").write_text(f"{run_path}\n")
        return logger
    except Exception as exc:  # any W&B failure: warn and carry on with CSV
        reason = first_line(exc)
        log.warning("wandb logging disabled: %s (W&B could not start; continuing with %s only)", reason, csv_file)
        return None


def _safe_wandb_class():
    from lightning.pytorch.loggers import WandbLogger

    class SafeWandbLogger(WandbLogger):
        """A WandbLogger whose failures after start-up are logged once and otherwise ignored."""

        _failed = False

        def _guard(self, method: str, *args: Any, **kwargs: Any) -> None:
            if self._failed:
                return
            try:
                getattr(super(), method)(*args, **kwargs)
            except Exception as exc:
                self._failed = True
                log.warning("W&B logging failed (%s); further W&B logging is skipped", exc)

        def log_metrics(self, *args: Any, **kwargs: Any) -> None:
            self._guard("log_metrics", *args, **kwargs)

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            self._guard("log_hyperparams", *args, **kwargs)

        def after_save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
            self._guard("after_save_checkpoint", *args, **kwargs)

        def finalize(self, *args: Any, **kwargs: Any) -> None:
            self._guard("finalize", *args, **kwargs)

    return SafeWandbLogger


def _SafeWandbLogger(**kwargs: Any):  # noqa: N802 - reads like the class it builds
    return _safe_wandb_class()(**kwargs)
