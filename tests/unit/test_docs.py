"""The documentation stays true: the CLI reference is current, every documented command parses,
links resolve, and the walkthroughs run as written (with shorter training)."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from helpers.markdown_runner import code_blocks, run_page, state_commands

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
COMMAND_PAGES = [*PAGES, ROOT / "README.md", ROOT / "examples" / "README.md"]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_cli_reference", DOCS / "generate_cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current():
    generator = _generator()
    assert (DOCS / "cli.md").read_text() == generator.render(), (
        "docs/cli.md is out of date: run `python docs/generate_cli_reference.py`"
    )
    assert generator.main(["--check"]) == 0


def test_cli_reference_lists_every_command_and_flag():
    from state.cli import build_parser

    text = (DOCS / "cli.md").read_text()
    generator = _generator()
    parser = build_parser()
    for family, family_parser in generator._subcommands(parser).items():
        for name, leaf in generator._subcommands(family_parser).items():
            assert f"### `state {family} {name}`" in text
            for action in leaf._actions:
                for flag in action.option_strings:
                    if action.help != "==SUPPRESS==":
                        assert f"`{flag}`" in text, (family, name, flag)


def _documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in COMMAND_PAGES:
        for argv in state_commands(page):
            found.append((page.name, argv))
    return found


def test_docs_show_commands():
    pages = {page for page, _ in _documented_commands()}
    assert {"vcc_walkthrough.md", "embedding_walkthrough.md", "faq.md", "README.md"} <= pages


@pytest.mark.parametrize(("page", "argv"), _documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_parses(page, argv):
    """Flags exist; `state tx train` overrides name real keys of the packaged config."""
    from state.cli import build_parser
    from state.tx.config.compose import compose_tx_config

    args = build_parser().parse_args(argv[1:])
    if args.handler.endswith(":train") and args.command == "tx" and not args.help:
        compose_tx_config(args.hydra_overrides)


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.name)
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: broken link {target}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{page.name}: no heading for #{anchor} in {file.name}"


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    for page in PAGES:
        if page.name != "index.md":
            assert f"]({page.name})" in index, page.name


def test_skipped_blocks_say_why_and_runnable_blocks_exist():
    for page in ("vcc_walkthrough.md", "embedding_walkthrough.md", "python_api.md"):
        blocks = [b for b in code_blocks(DOCS / page) if b.lang in ("bash", "python")]
        assert sum(not b.skip for b in blocks) >= 3, page
        assert all(len(b.skip) > 5 for b in blocks if b.skip), page


def test_singularity_definition_matches_the_package():
    text = (ROOT / "singularity.def").read_text()
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", text, flags=re.M | re.S))
    assert {"files", "post", "runscript", "test", "environment", "help"} <= set(sections)
    for path in ("pyproject.toml", "README.md", "LICENSE", "src", "configs"):
        assert re.search(rf"^\s+{re.escape(path)} /opt/state/", sections["files"], re.M), path
        assert (ROOT / path).exists(), path
    assert "/opt/state[vectordb]" in sections["post"]  # installs this project, not arc-state
    assert re.search(r"exec \S*state \"\$@\"", sections["runscript"])
    assert "state --version" in sections["test"]
    faq = (DOCS / "faq.md").read_text()
    assert "singularity run --nv -B" in faq and "singularity test state.sif" in faq


def _workdir(tmp_path: Path, monkeypatch) -> Path:
    """An empty working directory that sees the repository's examples and test fixtures."""
    for name in ("examples", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _shorter(argv: list[str]) -> list[str]:
    """Keep the walkthrough fast: a few training steps; predict without cell-eval's metrics (those are
    covered by tests/compat/test_tx_predict_fixtures.py::test_predict_reproduces_arc_state_and_scores)."""
    if argv[1:3] == ["tx", "train"]:
        return ["training.max_steps=2", "training.val_freq=2"]
    if argv[1:3] == ["tx", "predict"]:
        return ["--predict-only"]
    return []


def test_vcc_walkthrough_runs(tmp_path, monkeypatch):
    work = _workdir(tmp_path, monkeypatch)
    if shutil.which("zstd") is None:
        pytest.skip("cell-eval prep needs the zstd program")
    run_page(DOCS / "vcc_walkthrough.md", extra_args=_shorter)
    vcc = work / "vcc"
    summary = pd.read_csv(vcc / "stats" / "perturbation_summary.csv")
    assert (summary["target_gene_delta"] < 0).all()  # what the page promises
    assert (summary["target_gene_rank"] <= 20).all()  # of 200 genes
    assert (vcc / "runs" / "first_run" / "eval_final.ckpt" / "adata_pred.h5ad").is_file()
    prediction = ad.read_h5ad(vcc / "prediction.h5ad")
    counts = prediction.obs["target_gene"].astype(str).value_counts()
    assert counts["HBB"] == 40 and counts["TUBB"] == 60 and counts["MCM2"] == 50
    assert (vcc / "prediction.prep.vcc").is_file()


@pytest.mark.slow
def test_vcc_walkthrough_runs_verbatim(tmp_path, monkeypatch):
    work = _workdir(tmp_path, monkeypatch)
    run_page(DOCS / "vcc_walkthrough.md")
    assert (work / "vcc" / "runs" / "first_run" / "eval_final.ckpt" / "H1_agg_results.csv").is_file()


def test_embedding_walkthrough_runs(tmp_path, monkeypatch, capsys):
    work = _workdir(tmp_path, monkeypatch)
    namespace = run_page(DOCS / "embedding_walkthrough.md")
    hits = pd.read_csv(work / "emb" / "neighbours.csv")
    query = ad.read_h5ad(work / "emb" / "query.h5ad")
    assert len(hits) == 5 * query.n_obs
    filtered = pd.read_csv(work / "emb" / "neighbours_typeX.csv")
    assert set(filtered["cell_type"]) == {"typeX"} and len(filtered) == 3 * query.n_obs
    # the Python block finds the same neighbours as the command line (same seed, same model)
    api_hits = namespace["hits"]
    assert list(api_hits["cell_id"]) == list(hits["cell_id"])
    assert list(api_hits["query_cell_id"]) == list(hits["query_cell_id"])
