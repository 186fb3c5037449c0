"""`evomerge report` and optuna-dashboard, on a real study DB written by the real controller."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.report import plot_path
from evomerge.store import StudyStore
from evomerge.study import Study
from evomerge.studyfile import load_study
from tests.conftest import small_study
from tests.test_reliability import NaNWeightForSecond


@pytest.fixture(scope="module")
def study(tmp_path_factory, small_executor) -> Path:
    """Eight trials, one of them failed, and the final table: everything a report draws."""
    path = small_study(tmp_path_factory.mktemp("report"))
    cfg = load_study(path)
    s = Study(cfg, executor=NaNWeightForSecond(small_executor))
    s.run(8)
    s.final_table()
    return path


@pytest.fixture(scope="module")
def report(study) -> Path:
    out = study.parent / "report"
    r = CliRunner().invoke(app, ["report", str(study), "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def db(study: Path) -> StudyStore:
    return StudyStore(f"sqlite:///{study.parent / 'tiny-ps.db'}", "tiny-ps")


@pytest.mark.parametrize("name", ["scores.png", "tasks.png", "recipe.png"])
def test_each_plot_is_a_real_picture(report, name):
    with Image.open(report / name) as im:
        assert im.format == "PNG"
        assert 400 <= im.width <= 3000 and 250 <= im.height <= 3000
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, "the picture is blank"


def test_summary_embeds_every_plot(report):
    text = (report / "summary.md").read_text()
    for name in ("scores.png", "tasks.png", "recipe.png"):
        assert f"]({name})" in text


def test_summary_counts_and_best_match_the_db(report, study):
    text = (report / "summary.md").read_text()
    st = db(study)
    best = max((t for t in st.records() if t.state == TrialState.COMPLETE), key=lambda t: (t.value, -t.number))
    assert "- trials: 8 (7 complete, 1 failed, 0 running)" in text
    assert f"- best: trial {best.number}, fitness {best.value:.4f}" in text
    assert f"- search-space dimension: {st.get('dimension')}" in text


def test_summary_top_trials_table_is_the_db_ranking(report, study):
    text = (report / "summary.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", text, re.M)
    ranked = sorted((t for t in db(study).records() if t.state == TrialState.COMPLETE),
                    key=lambda t: (-t.value, t.number))[:5]
    assert [int(r[0]) for r in rows] == [t.number for t in ranked]
    for row, t in zip(rows, ranked):
        scores = t.scores
        assert int(row[1]) == t.generation
        assert float(row[2]) == round(t.value, 4)
        assert (float(row[3]), float(row[4])) == (round(scores["tiny_rot"], 4), round(scores["tiny_up"], 4))


def test_summary_test_split_table_matches_the_final_table(report, study):
    text = (report / "summary.md").read_text()
    for r in db(study).get("final")["rows"]:
        assert f"| {r['model']} | {r['test']:.4f} |" in text


def test_summary_lists_the_failed_trial_and_its_reason(report, study):
    failed = next(t for t in db(study).records() if t.state == TrialState.FAIL)
    assert f"- trial {failed.number}: {failed.error}" in (report / "summary.md").read_text()


def test_no_path_diagram_for_a_parameter_space_recipe(report):
    assert not (report / "path.png").exists() and "path.png" not in (report / "summary.md").read_text()


def test_a_layer_path_is_drawn_as_a_diagram(tmp_path):
    path = {"layers": [[i % 2, i // 2 + (i % 3)] for i in range(10)], "scales": [0.5 + 0.1 * i for i in range(10)]}
    out = plot_path(path, ["up", "rot"], tmp_path / "path.png")
    with Image.open(out) as im:
        assert im.width >= 400 and im.height >= 250
        assert im.convert("L").getextrema()[1] - im.convert("L").getextrema()[0] > 100


def test_report_into_an_unwritable_folder_exits_2_naming_it(study, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = CliRunner().invoke(app, ["report", str(study), "-o", str(blocker / "report")])
    assert r.exit_code == 2 and "cannot write the report" in r.output


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_optuna_dashboard_serves_the_study_and_its_trials(study):
    from optuna_dashboard import wsgi

    server = make_server("127.0.0.1", 0, wsgi(f"sqlite:///{study.parent / 'tiny-ps.db'}"), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=30))["study_summaries"]
        sid = next(s["study_id"] for s in studies if s["study_name"] == "tiny-ps")
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{sid}", timeout=30))
    finally:
        server.shutdown()
        server.server_close()
    trials = detail["trials"]
    assert len(trials) == 8
    assert sorted(t["state"] for t in trials) == ["Complete"] * 7 + ["Fail"]
    attrs = {a["key"] for a in trials[0]["user_attrs"]}
    assert {"evomerge.recipe", "evomerge.scores", "evomerge.genome"} <= attrs  # the names a dashboard user reads


def test_status_prints_the_best_recipe_compactly_in_unwrapped_lines(study):
    r = CliRunner().invoke(app, ["status", str(study)])  # output is not a terminal here: no wrapping
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(line.startswith("study tiny-ps: 7 complete, 1 failed") for line in lines)
    failed = next(line for line in lines if line.startswith("trial 1 failed: "))
    assert len(failed) > 80 and failed.endswith("not finite (NaN or inf)")  # one line, past a terminal's width
    assert "best recipe: ties of up, rot on base base" in lines
    groups = [line for line in lines if line.startswith("  layers.0: weight ")]
    assert len(groups) == 1 and ", density " in groups[0]


def test_status_reads_the_store_without_lm_eval_or_the_controller_loop(study):
    """A fresh process, since what counts is what `status` makes Python import."""
    code = ("import sys; from typer.testing import CliRunner; from evomerge.cli import app; "
            f"r = CliRunner().invoke(app, ['status', {str(study)!r}]); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('lm_eval', 'evomerge.study', 'evomerge.worker') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
