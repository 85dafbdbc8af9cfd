"""The sweep comparison report: numbers from each point's files land in the right cells,
plots are written, and prose around the markers survives a re-run."""

import json
import os

from hybridlm import cli
from hybridlm.eval.report import BEGIN, END, write_report

SEGS = ("begin", "needle", "context", "qc")


def _point(root, name, loss, val, niah, analysis_needle):
    w = root / name
    (w / "eval").mkdir(parents=True)
    (w / "config.json").write_text(json.dumps({"data": {"seq_len": 128}}))
    lines = [{"step": s, "loss": loss + (10 - s) * 0.1} for s in (1, 5, 10)]
    lines[-1]["val_loss"] = val
    (w / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    buckets = [{"start": 0, "end": 1, "center": 0.0, "loss": 5.0},
               {"start": 1, "end": 256, "center": 128.0, "loss": 3.0}]
    (w / "eval" / "ppl.json").write_text(json.dumps({"lengths": [
        {"length": 128, "documents": 2, "buckets": buckets, "mean_loss": val},
        {"length": 256, "documents": 2, "buckets": buckets, "mean_loss": val + 0.5},
        {"length": 512, "documents": 0, "buckets": [], "mean_loss": None}]}))
    (w / "eval" / "niah.json").write_text(json.dumps({"by_length": {"128": niah, "256": 0.0}}))
    (w / "eval" / "ruler.json").write_text(json.dumps({"summary": {
        "ruler_128": 0.25, "ruler_256": 0.125, "ruler": 0.1875, "niah_single_128": 1.0}}))
    masses = {"begin": 0.1, "needle": analysis_needle, "context": 0.4 - analysis_needle,
              "qc": 0.5, "entropy": 2.5}
    (w / "eval" / "analysis.json").write_text(json.dumps({"lengths": [
        {"length": 128, "by_type": {"global": masses}, "overall": masses}]}))
    (w / "after").mkdir()
    (w / "after" / "0.done").write_text("eval\n")
    for f, t in (("config.json", 0), ("metrics.jsonl", 120), ("after/0.done", 180)):
        os.utime(w / f, (1e9 + t, 1e9 + t))  # 2 minutes training, 1 minute evaluation


def test_report_tables_plots_and_markers(tmp_path):
    root = tmp_path / "sweep"
    _point(root, "rope", 2.5, 2.75, 0.5, 0.0625)
    _point(root, "nope", 3.0, 3.25, 1.0, 0.15)
    out = tmp_path / "docs" / "exp.md"
    out.parent.mkdir()
    out.write_text(f"# Experiments\n\nprose before\n\n{BEGIN}\nold\n{END}\n\nprose after\n")
    write_report(root, ["rope", "nope"], out, "test sweep")
    text = out.read_text()
    assert text.startswith("# Experiments\n\nprose before\n") and text.endswith("prose after\n")
    assert "old" not in text and text.count(BEGIN) == 1
    assert "| rope | 10 | 2.500 | 2.750 | 2.0 | 1.0 |" in text
    assert "| nope | 10 | 3.000 | 3.250 | 2.0 | 1.0 |" in text
    assert "Total wall time: 6 minutes." in text
    assert "| rope | 2.750 | 3.250 |" in text  # held-out loss at 128 (train) and 256
    assert "| nope | 1.000 | 0.000 |" in text  # needle by length
    assert "| rope | 0.250 | 0.125 |" in text  # RULER mean by length
    assert "| nope | 128 | global | 0.100 | 0.150 | 0.250 | 0.500 | 2.50 |" in text
    for image in ("train_loss", "heldout_loss", "niah", "ruler", "loss_by_position",
                  "attention_mass"):
        assert (tmp_path / "docs" / "img" / "exp" / f"{image}.png").stat().st_size > 1000
        assert f"](img/exp/{image}.png)" in text
    write_report(root, ["rope", "nope"], out, "test sweep")  # a re-run changes nothing
    assert out.read_text() == text


def test_report_needs_summarize(tmp_path, capsys):
    assert cli.main(["sweep", "--sweep", "configs/experiments/paper_mini.py", "--launcher",
                     "print", "--root", str(tmp_path), "--report", "x.md"]) == 2
    assert "--report FILE.md needs --summarize" in capsys.readouterr().err
