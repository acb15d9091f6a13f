"""`mmtune plot`: a PNG from metrics.jsonl, clear errors on bad input."""

from __future__ import annotations

import json

import pytest

from mmtune.plot import main, plot_metrics, read_metrics


def _write_metrics(path, n=20, keys=("loss", "lr", "grad_norm", "tokens_per_s")):
    with open(path, "w") as f:
        for step in range(1, n + 1):
            rec = {"step": step}
            values = {"loss": 5.0 / step, "lr": 1e-3 * step / n, "grad_norm": 1.0, "tokens_per_s": 1000.0 + step}
            rec.update({k: values[k] for k in keys})
            f.write(json.dumps(rec) + "\n")


def test_plot_writes_png_with_one_panel_per_quantity(tmp_path):
    from PIL import Image

    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    out = plot_metrics(metrics, smooth=5)
    assert out == tmp_path / "loss.png"
    three = Image.open(out)
    assert three.format == "PNG"
    # a file with only the loss gets one panel: a shorter figure
    _write_metrics(tmp_path / "only_loss.jsonl", keys=("loss",))
    one = Image.open(plot_metrics(tmp_path / "only_loss.jsonl", tmp_path / "one.png"))
    assert one.size[1] < three.size[1] / 2


def test_plot_cli_accepts_save_dir_and_out(tmp_path, capsys):
    _write_metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "sub" / "curves.png"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_plot_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path / "metrics.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_metrics(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        read_metrics(empty)
    nokeys = tmp_path / "nokeys.jsonl"
    nokeys.write_text('{"step": 1, "other": 3}\n')
    with pytest.raises(ValueError, match="none of"):
        plot_metrics(nokeys)
