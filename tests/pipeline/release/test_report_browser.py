"""report.html: its content on a curate dir and a release dir, and a real headless browser
(Debian chromium) rendering it: the page loads, every image decodes, the screenshot is not blank."""
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from capfilt.jobs.cli import main
from capfilt.pipeline.release.build import ReleaseConfig, build_release
from release_data import image_bytes, near_copy, pixel_embedder, row, write_curated

XSS = '<script>alert("x")</script> & <b>bold</b>'


class ImgCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.scripts = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))
        if tag == "script":
            self.scripts += 1


@pytest.fixture
def curate_dir(tmp_path):
    rows = [row(f"k{i}", image_bytes(i), clip=0.2 + 0.05 * i, itm=0.6 + 0.03 * i) for i in range(6)]
    rows += [row(f"d{i}", image_bytes(20 + i), keep=False, drop_reason=r)
             for i, r in enumerate(["no_caption_passed", "no_caption_passed", "empty_caption"])]
    rows.append(row("evil", image_bytes(40), web_caption=XSS))
    return write_curated(tmp_path / "cur", [rows[:5], rows[5:]])


def parse(path):
    p = ImgCollector()
    text = path.read_text(encoding="utf-8")
    p.feed(text)
    return text, p


def test_report_on_curate_dir(curate_dir, capsys):
    assert main(["report", str(curate_dir), "--samples", "4"]) == 0
    text, page = parse(curate_dir / "report.html")
    # 4 plots + 4 kept + 3 dropped samples (there are only 3 dropped rows)
    assert len(page.srcs) == 4 + 4 + 3
    assert all(s.startswith("data:image/") for s in page.srcs)  # self-contained
    assert page.scripts == 0 and XSS not in text and "&lt;script&gt;alert(" in text
    assert "no_caption_passed" in text and "empty_caption" in text
    assert re.search(r"<th>input_rows</th><td>10</td>", text)
    assert "report written to" in capsys.readouterr().out


def test_report_on_release_dir(tmp_path, curate_dir):
    extra = write_curated(tmp_path / "cur2", [[row("k1copy", image_bytes(1), clip=0.0), row("n3", near_copy(3))]])
    out = tmp_path / "rel"
    build_release(ReleaseConfig([curate_dir, extra], out, dedup_threshold=0.9), embedder=pixel_embedder)
    text, page = parse(out / "report.html")
    assert "capfilt release report" in text
    assert "exact_duplicate" in text and "near_duplicate" in text and "not_kept: empty_caption" in text
    # removed rows show their image, read back from the input shards
    assert "image not available" not in text
    assert all(s.startswith("data:image/") for s in page.srcs)
    assert main(["report", str(out), "--out", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text(encoding="utf-8") == text  # deterministic page


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a release" in capsys.readouterr().err


def test_report_unwritable_out_is_a_clean_error(curate_dir, tmp_path, capsys):
    (tmp_path / "truth.parquet").write_bytes(b"PAR1")
    bad = tmp_path / "truth.parquet" / "x.html"
    assert main(["report", str(curate_dir), "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"capfilt report: cannot write the report to {bad}: {bad.parent} is not a directory" in err
    assert "Traceback" not in err and (tmp_path / "truth.parquet").read_bytes() == b"PAR1"
    assert main(["report", str(curate_dir), "--out", str(tmp_path)]) == 2
    assert f"cannot write the report to {tmp_path}: it is a directory" in capsys.readouterr().err
    # a missing parent directory is created
    assert main(["report", str(curate_dir), "--out", str(tmp_path / "new" / "r.html"), "--samples", "0"]) == 0
    assert (tmp_path / "new" / "r.html").is_file()


CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var d = document.createElement('div');
  d.id = 'img-check';
  d.textContent = 'loaded=' + ok + ' total=' + imgs.length + ' height=' + document.body.scrollHeight;
  document.body.appendChild(d);
});
</script>"""


def test_report_renders_in_headless_chromium(curate_dir, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        message = "chromium is not installed (.ci/run installs it with apt-get install chromium)"
        if os.environ.get("CI"):  # CI must run the browser check, not skip it
            pytest.fail(message)
        pytest.skip(message)
    assert main(["report", str(curate_dir), "--samples", "4"]) == 0
    # A copy with a probe script that counts decoded images; the report itself has no script.
    probe = tmp_path / "probe.html"
    probe.write_text((curate_dir / "report.html").read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                     encoding="utf-8")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,1600"]
    dom = subprocess.run(flags + [f"--user-data-dir={tmp_path / 'profile1'}", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=180)
    m = re.search(r"loaded=(\d+) total=(\d+) height=(\d+)", dom.stdout)
    assert m, f"page did not finish loading: {dom.stderr[-2000:]}"
    loaded, total, height = map(int, m.groups())
    assert total == 4 + 4 + 3 and loaded == total and height > 1600
    assert 'id="dropped"' in dom.stdout and "evil" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                            (curate_dir / "report.html").as_uri()], capture_output=True, timeout=180)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20  # text and plots, not a blank page
    assert (pixels < 128).mean() > 0.005  # a real amount of dark ink


def test_control_and_bidi_characters_in_keys_are_shown_not_obeyed(tmp_path):
    """A key holding NUL or a right-to-left override would hide or reverse text on the page."""
    key = "abc\u202ejpg.exe\x00x"
    out = write_curated(tmp_path / "cur", [[row(key, image_bytes(1)), row("plain", image_bytes(2))]])
    assert main(["report", str(out), "--samples", "4"]) == 0
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "\u202e" not in text and "\x00" not in text
    assert "abc\\u202ejpg.exe\\u0000x" in text
