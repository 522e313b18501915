"""`llm plot`: a PNG from a small synthetic metrics.jsonl, and clear errors for bad files."""

import json
import math

import pytest

from llm.cli import main
from llm.errors import UserError
from llm.run.plot import load_metrics, plot_run, series


def _write_run(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _synthetic(run_dir):
    lines = []
    for step in range(1, 41):
        lines.append(
            json.dumps(
                {"step": step, "loss": 6 * math.exp(-step / 20), "tokens_per_s": 1000.0 + step, "mfu": 0.2, "lr": 1e-3}
            )
        )
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "val_loss": 6.5 * math.exp(-step / 20), "val_ppl": 10.0}))
    # a resumed run repeats step 40 with a different loss: the later record wins
    lines.append(json.dumps({"step": 40, "loss": 0.5, "tokens_per_s": 900.0, "mfu": 0.18}))
    _write_run(run_dir, lines)


def test_plot_writes_png(tmp_path):
    run = tmp_path / "run"
    _synthetic(run)
    assert main(["plot", str(run)]) == 0
    png = run / "metrics.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as image:
        width, height = image.size
        assert width > 800 and height > 300
        # not a blank canvas: curves put several colours on it
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10


def test_series_sorted_and_last_record_wins(tmp_path):
    run = tmp_path / "run"
    _synthetic(run)
    records = load_metrics(run)
    steps, loss = series(records, "loss")
    assert steps == list(range(1, 41))
    assert loss[-1] == 0.5
    val_steps, val = series(records, "val_loss")
    assert val_steps == [10, 20, 30, 40]
    assert val[0] == pytest.approx(6.5 * math.exp(-0.5))


def test_plot_out_path(tmp_path):
    run = tmp_path / "run"
    _synthetic(run)
    out = plot_run(run, out=tmp_path / "figs" / "curves.png")
    assert out.is_file() and out.parent.name == "figs"


@pytest.mark.parametrize(
    "lines, message",
    [
        (None, "not found"),
        (['{"step": 1, "loss": 2.0}', "{not json"], "metrics.jsonl:2: not valid JSON"),
        (['{"loss": 2.0}'], "metrics.jsonl:1: expected a JSON object with an integer 'step'"),
        (['{"step": 1, "lr": 0.1}'], "no 'loss' or 'val_loss'"),
    ],
)
def test_bad_metrics_name_the_file(tmp_path, lines, message, capsys):
    run = tmp_path / "run"
    if lines is None:
        run.mkdir()
    else:
        _write_run(run, lines)
    with pytest.raises(UserError, match=message):
        plot_run(run)
    assert main(["plot", str(run)]) == 2
    assert message.split(":")[-1].strip().split()[0] in capsys.readouterr().err


def test_every_metric_has_its_own_labelled_axes(tmp_path):
    import matplotlib.pyplot as plt

    from llm.run.plot import figure

    run = tmp_path / "run"
    _synthetic(run)
    fig = figure(load_metrics(run), "run")
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert {"loss", "learning rate", "gradient norm", "throughput", "model FLOPs utilisation"} <= set(panels)
    assert len(fig.axes) == len(panels)  # no twin axes: two units never share a panel
    for title, ax in panels.items():
        assert ax.get_xlabel() == "step" and ax.get_ylabel(), title
    loss_labels = [t.get_text() for t in panels["loss"].get_legend().get_texts()]
    assert loss_labels == ["train", "validation"]
    (mfu,) = panels["model FLOPs utilisation"].get_lines()
    assert list(mfu.get_ydata())[0] == pytest.approx(20.0)  # percent, from the 0.2 in the file
    (lr,) = panels["learning rate"].get_lines()
    assert list(lr.get_xdata()) == list(range(1, 41))
    assert not panels["gradient norm"].get_lines()  # absent from the file: an empty, labelled panel
    plt.close(fig)
