"""Markdown tables from DataFrames without the optional `tabulate` dependency of `DataFrame.to_markdown`."""

from __future__ import annotations

import pandas as pd


def markdown_table(df: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    """A GitHub-flavoured Markdown table of `df` (floats with `float_format`, NaN as blank)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "" if v != v else float_format.format(v)
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
