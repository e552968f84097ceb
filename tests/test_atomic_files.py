"""Output files: written whole or not at all, and figures with the same bytes every run (no dates, no random ids,
no temporary names inside)."""

from __future__ import annotations

import gzip
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sim.atomic_files import save_figure_file, write_atomic  # noqa: E402

FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "tif", "webp")


def _figure() -> plt.Figure:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [1, 3, 2], label="a")
    ax.set_title("t")
    ax.legend()
    return fig


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_figure_saved_twice_under_other_names_and_times_has_the_same_bytes(tmp_path, monkeypatch, fmt):
    fig = _figure()
    try:
        first = save_figure_file(fig, tmp_path / f"one.{fmt}").read_bytes()
        # another clock and time zone: dates must not reach the file
        monkeypatch.setenv("TZ", "Asia/Tokyo")
        monkeypatch.setattr("time.time", lambda: 2_000_000_000.0)
        second = save_figure_file(fig, tmp_path / "sub" / f"two.{fmt}").read_bytes()
    finally:
        plt.close(fig)
    assert first == second
    assert b".tmp" not in first  # no temporary file name inside (PostScript titles itself with its file's name)
    if fmt in ("eps", "ps"):
        assert b"CreationDate: Thu Jan 01 00:00:00 1970" in first
    if fmt == "pdf":
        assert b"/CreationDate" not in first
    if fmt in ("svg", "svgz"):
        text = gzip.decompress(first) if fmt == "svgz" else first
        assert b"<dc:date>" not in text and text.startswith(b"<?xml")
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file left behind


def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
