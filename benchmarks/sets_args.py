"""The command line of the benchmarks that compare two versions of a step over parameter sets drawn from a model's IIV."""

from __future__ import annotations

import argparse


def sets_arguments(doc: str, sets: int = 200) -> argparse.Namespace:
    """``--sets`` (parameter sets per case) and ``--seed`` (of their draw), with the script's first paragraph as help."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--sets", type=int, default=sets)
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()
