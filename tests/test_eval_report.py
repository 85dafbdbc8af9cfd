"""The sweep comparison report: numbers from each point's files land in the right cells
(seeds pooled, intervals, chance and uniform baselines beside them), plots are written,
and prose around the markers survives a re-run."""

import json
import os

from hybridlm import cli
from hybridlm.eval.report import BEGIN, END, group_of, write_report

SEGS = ("begin", "needle", "context", "qc")
MODEL = {"num_kv_heads": 2, "head_dim": 8, "num_layers": 4, "pattern": "local,local,local,global",
         "layer_types": {"local": {"rope": True, "window": 16}, "global": {"rope": False}}}


def _point(root, name, loss, val, niah, analysis_needle, start=0):
    w = root / name
    (w / "eval").mkdir(parents=True)
    (w / "config.json").write_text(json.dumps({"data": {"seq_len": 128}, "model": MODEL}))
    lines = [{"step": s, "loss": loss + (10 - s) * 0.1} for s in (1, 5, 10)]
    lines[-1]["val_loss"] = val
    (w / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    buckets = [{"start": 0, "end": 1, "center": 0.0, "loss": 5.0},
               {"start": 1, "end": 256, "center": 128.0, "loss": 3.0}]
    (w / "eval" / "ppl.json").write_text(json.dumps({"lengths": [
        {"length": 128, "documents": 2, "buckets": buckets, "mean_loss": val},
        {"length": 256, "documents": 2, "buckets": buckets, "mean_loss": val + 0.5},
        {"length": 512, "documents": 0, "buckets": [], "mean_loss": None}]}))
    needles = {"by_length": {"128": niah, "256": 0.0}, "n_per_length": 100, "chance": 0.0,
               "lengths": [128, 256], "depths": [0.0, 1.0], "grid": [[niah, 0.0], [niah, 0.0]]}
    (w / "eval" / "niah.json").write_text(json.dumps({
        **needles, "summary": {"niah_128": niah}, "train_values": {**needles,
                                                                   "by_length": {"128": 1.0}}}))
    (w / "eval" / "ruler.json").write_text(json.dumps({"summary": {
        "ruler_128": 0.25, "ruler_256": 0.125, "ruler": 0.1875, "niah_single_128": 1.0},
        "chance": 0.125, "tasks": {"a": {"n_per_length": 30}, "b": {"n_per_length": 30}}}))
    masses = {"begin": 0.1, "needle": analysis_needle, "context": 0.4 - analysis_needle,
              "qc": 0.5, "entropy": 2.5}
    uniform = {"begin": 0.25, "needle": 0.125, "context": 0.5, "qc": 0.125, "entropy": 3.0}
    (w / "eval" / "analysis.json").write_text(json.dumps({"lengths": [
        {"length": 128, "by_type": {"global": {**masses, "uniform": uniform}},
         "overall": {**masses, "uniform": uniform}}]}))
    (w / "after").mkdir()
    (w / "after" / "0.done").write_text("eval\n")
    for f, t in (("config.json", 0), ("metrics.jsonl", 120), ("after/0.done", 180)):
        os.utime(w / f, (1e9 + start + t, 1e9 + start + t))  # 2 min training, 1 min eval


def test_report_tables_plots_and_markers(tmp_path):
    root = tmp_path / "sweep"
    _point(root, "rope_s0", 2.5, 2.75, 0.5, 0.0625)
    _point(root, "rope_s1", 2.5, 2.85, 0.7, 0.0625, start=60)  # ran beside rope_s0
    _point(root, "nope", 3.0, 3.25, 1.0, 0.15, start=180)
    assert group_of("rope_s1") == "rope" and group_of("rope_ext_s12") == "rope_ext"
    out = tmp_path / "docs" / "exp.md"
    out.parent.mkdir()
    out.write_text(f"# Experiments\n\nprose before\n\n{BEGIN}\nold\n{END}\n\nprose after\n")
    names = ["rope_s0", "rope_s1", "rope_s2", "nope"]  # rope_s2 never ran: not a seed
    write_report(root, names, out, "test sweep")
    text = out.read_text()
    assert text.startswith("# Experiments\n\nprose before\n") and text.endswith("prose after\n")
    assert "old" not in text and text.count(BEGIN) == 1
    assert "| rope_s0 | 10 | 2.500 | 2.750 | 2.0 | 1.0 |" in text
    assert "| nope | 10 | 3.000 | 3.250 | 2.0 | 1.0 |" in text
    assert "Wall time: 6 minutes from the first start to the last finish; the points' own " \
           "times add up to 9 minutes." in text
    assert "| rope (2 seeds) | 2.800 (2.75-2.85) | 3.300 (3.25-3.35) |" in text  # loss
    # needles: the two seeds' 100 samples each pooled, 120 of 200: Wilson [0.531, 0.665]
    assert "| rope (2 seeds) | 0.600 [0.53, 0.67] (0.50-0.70) | 0.000 [0.00, 0.02] " \
           "(0.00-0.00) | 0 |" in text
    assert "| nope | 1.000 [0.96, 1.00] | 0.000 [0.00, 0.04] | 0 |" in text
    assert "| nope | 1.000 [0.96, 1.00] | 0 |" in text  # training-split values (128 only)
    # RULER: 2 tasks x 30 samples per length; Wilson of 15 / 60 and 7.5 / 60
    assert "| nope | 0.250 [0.16, 0.37] | 0.125 [0.06, 0.23] | 0.125 |" in text
    assert "| rope (2 seeds) | 0% | 0.60 | 0.00 |" in text  # by depth, mean of the seeds
    assert ("| point | length | seed 0 | seed 1 |\n|---|---|---|---|\n"
            "| rope | 128 (train) | 0.50 / 1.00 | 0.70 / 1.00 |\n"
            "| rope | 256 | 0.00 / - | 0.00 / - |\n") in text  # each seed at each length
    assert "| nope | 128 (train) |" not in text  # one run: no seed-by-seed row
    assert "| nope | 0.344 | 0.297 | 0.250 |" in text  # KV cache: (3 * 16 + L) / 4L
    assert "| nope | 128 | global | 0.100 (0.250) | 0.150 (0.125) | 0.250 (0.500) | " \
           "0.500 (0.125) | 2.50 (3.00) |" in text
    for image in ("train_loss", "heldout_loss", "niah", "niah_train", "ruler",
                  "loss_by_position", "attention_mass"):
        assert (tmp_path / "docs" / "img" / "exp" / f"{image}.png").stat().st_size > 1000
        assert f"](img/exp/{image}.png)" in text
    points = json.loads((tmp_path / "docs" / "img" / "exp" / "points.json").read_text())
    assert points["rope_s1"]["niah"]["summary"] == {"niah_128": 0.7}
    write_report(root, names, out, "test sweep")  # a re-run changes nothing
    assert out.read_text() == text


def test_training_length_is_the_evaluated_points_not_a_warm_stage(tmp_path):
    """A chain's first stage (shorter rows, no evaluations) does not set the marked length."""
    root = tmp_path / "sweep"
    warm = root / "rope_warm_s0"
    warm.mkdir(parents=True)
    (warm / "config.json").write_text(json.dumps({"data": {"seq_len": 64}, "model": MODEL}))
    (warm / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0}) + "\n")
    _point(root, "rope_s0", 2.5, 2.75, 0.5, 0.0625)
    out = tmp_path / "exp.md"
    write_report(root, ["rope_warm_s0", "rope_s0"], out, "test sweep")
    assert "| point | 128 (train) | 256 |" in out.read_text()


def test_report_needs_summarize(tmp_path, capsys):
    assert cli.main(["sweep", "--sweep", "configs/experiments/paper_mini.py", "--launcher",
                     "print", "--root", str(tmp_path), "--report", "x.md"]) == 2
    assert "--report FILE.md needs --summarize" in capsys.readouterr().err


def test_paper_mini_warm_arguments_reach_the_commands(tmp_path, capsys):
    """The copying warm stage (window 8, text) and n-gram repeats as sweep arguments: the
    printed commands carry them, and every point's config is checked before anything runs."""
    spec = ("configs/experiments/paper_mini.py:seeds=1,variants=rnope_swa,warm_window=8,"
            "warm_text=0.3,ngram=0.5")
    assert cli.main(["sweep", "--sweep", spec, "--launcher", "print",
                     "--root", str(tmp_path)]) == 0
    warm, stage2 = capsys.readouterr().out.splitlines()[:2]
    assert "window=8,variant=rnope_swa,seq_len=64" in warm
    assert "--config.data.weights=0.35,0.35,0.3" in warm and "64:repeat_ngram" in warm
    assert "--config.data.weights=0.15,0.6,0.125,0.125" in stage2
