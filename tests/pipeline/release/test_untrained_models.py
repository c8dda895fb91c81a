"""A model no training has touched (`capfilt models init`: random weights) is marked when it is
written (capfilt_model.json, "trained": false) and curate, release and the report warn about it
in the log, the manifest and report.html; a trained copy (no mark) gives no warning."""
import json
import shutil

import pyarrow.parquet as pq
import pytest

from capfilt.model.specs import MODEL_RECORD, identity, untrained
from cli_run import run_cli

WARNING = "is untrained: random weights from `capfilt models init` that no training has touched"


@pytest.fixture
def two_rows(tmp_path, synth_world):
    table = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0]).slice(0, 2)
    path = tmp_path / "in" / "00000.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    return path


def _curate(models, inputs, out):
    return run_cli(["curate", "--input", str(inputs), "--out", str(out), "--captioner", str(models["captioner"]),
                    "--filter", str(models["itm"]), "--clip", str(models["clip"]), "--num-captions", "1",
                    "--max-length", "8", "--min-length", "2", "--torch-threads", "1", "--precision", "fp32"])


def test_models_init_marks_its_directory_untrained(tiny_models):
    for kind, path in tiny_models.items():
        record = json.loads((path / MODEL_RECORD).read_text())
        assert (record["trained"], record["kind"], record["seed"]) == (False, kind, 0)
        assert untrained(path) and identity(str(path))["untrained"] is True


def _warned(caplog) -> list[str]:
    found = [r.getMessage() for r in caplog.records if WARNING in r.getMessage() and r.levelname == "WARNING"]
    caplog.clear()
    return found


def test_curate_release_and_report_warn_about_an_untrained_model(tmp_path, tiny_models, two_rows, caplog):
    caplog.set_level("WARNING")
    out = tmp_path / "cur"
    code, stdout, stderr = _curate(tiny_models, two_rows, out)
    assert code == 0, stderr
    assert [w.split(WARNING)[0].split() for w in _warned(caplog)] == [
        ["--captioner", str(tiny_models["captioner"])], ["--clip", str(tiny_models["clip"])],
        ["--filter", str(tiny_models["itm"])]]
    models = json.loads((out / "manifest.json").read_text())["models"]
    assert {role: m.get("untrained") for role, m in models.items()} == {"captioner": True, "filter": True, "clip": True}
    assert run_cli(["report", str(out)])[0] == 0
    assert len(_warned(caplog)) == 3
    page = (out / "report.html").read_text()
    assert page.count('<p class="warning"><b>Warning:</b>') == 3 and f"captioner {tiny_models['captioner']} {WARNING}" in page

    rel = tmp_path / "rel"
    code, _, stderr = run_cli(["release", "--input", str(out), "--out", str(rel), "--clip", str(tiny_models["clip"])])
    assert code == 0, stderr
    assert sorted(w.split(WARNING)[0].split()[1] for w in _warned(caplog)) == [  # once each: the report adds none
        "input", "input", "input", "release_clip"]
    manifest = json.loads((rel / "manifest.json").read_text())
    assert manifest["models"]["release_clip"]["untrained"] is True
    assert f"**Warning:** release_clip {tiny_models['clip']} {WARNING}" in (rel / "README.md").read_text()
    assert (rel / "report.html").read_text().count('<p class="warning">') == 4


def test_a_trained_model_gives_no_warning(tmp_path, tiny_models, two_rows, caplog):
    caplog.set_level("WARNING")
    trained = {}
    for kind in ("captioner", "itm", "clip"):  # what training writes: the library's files, no mark
        trained[kind] = shutil.copytree(tiny_models[kind], tmp_path / "trained" / kind)
        (trained[kind] / MODEL_RECORD).unlink()
    code, _, stderr = _curate(trained, two_rows, tmp_path / "cur")
    assert code == 0, stderr
    assert _warned(caplog) == []
    models = json.loads((tmp_path / "cur" / "manifest.json").read_text())["models"]
    assert all("untrained" not in m for m in models.values())
    assert run_cli(["report", str(tmp_path / "cur")])[0] == 0
    assert 'class="warning"' not in (tmp_path / "cur" / "report.html").read_text()
