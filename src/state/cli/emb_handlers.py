"""Thin handlers for ``state emb ...``: turn argparse results into calls of pure functions.

Each engine module is imported inside its handler so that ``state --help`` stays fast.
"""

from __future__ import annotations

import argparse


def fit(args: argparse.Namespace) -> int:
    from state.emb.fit import fit_cli

    return fit_cli(args)


def transform(args: argparse.Namespace) -> int:
    from state.emb.transform import transform_cli

    return transform_cli(args)


def query(args: argparse.Namespace) -> int:
    from state.emb.vectordb import query_cli

    return query_cli(args)


def preprocess(args: argparse.Namespace) -> int:
    from state.emb.preprocess import preprocess_cli

    return preprocess_cli(args)


def eval_(args: argparse.Namespace) -> int:
    from state.emb.evaluate import eval_cli

    return eval_cli(args)
