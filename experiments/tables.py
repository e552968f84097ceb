"""Markdown tables from DataFrames without the optional `tabulate` dependency of `DataFrame.to_markdown`."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd


def markdown_table(df: pd.DataFrame, float_format: str | Callable[[float], str] = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table of `df` (floats with `float_format`, a format string or a function;
    NaN as blank)."""
    fmt = float_format.format if isinstance(float_format, str) else float_format

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if v != v else fmt(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
