"""`capfilt ingest` end to end against an HTTP server on 127.0.0.1 (a thread in this test) that
serves the synthetic images, 404s and an HTML page, plus a URL on a closed port (refused)."""
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import socket
import threading

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.ingest import list_columns, parse_img2dataset_options
from pipeline.sources import ReadShardFn, discover_shards, validate_shard

N_IMAGES = 5


@pytest.fixture(scope="module")
def server(synth_world):
    """(base url, {path: image bytes}, closed-port url); shut down after the module."""
    rows = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0]).slice(0, N_IMAGES).to_pylist()
    images = {f"/img/{r['key']}.jpg": r["jpg"] for r in rows}
    captions = {f"/img/{r['key']}.jpg": r["caption"] for r in rows}

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold a server thread

        def do_GET(self):
            if self.path in images:
                self._send(200, "image/jpeg", images[self.path])
            elif self.path == "/page.html":
                self._send(200, "text/html", b"<!doctype html><html><body>not an image</body></html>")
            else:
                self.send_error(404)

        def _send(self, code, ctype, body):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/gone.jpg"
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, images, captions, closed
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def url_rows(server):
    base, images, captions, closed = server
    rows = [(base + path, captions[path]) for path in images]
    rows += [(base + "/missing.jpg", "a 404"), (base + "/page.html", "an html page"), (closed, "refused")]
    return rows


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


IMG2DATASET = ["--processes_count", "1", "--thread_count", "4", "--timeout", "5", "--retries", "0",
               "--resize_mode", "no", "--skip-reencode", "--number_sample_per_shard", "4"]


def read_everything(pattern):
    samples, errors = [], []
    for info in (validate_shard(s) for s in discover_shards([pattern])):
        for out in ReadShardFn().process(info):
            (errors if isinstance(out, beam.pvalue.TaggedOutput) else samples).append(out)
    return samples, [e.value for e in errors]


def check_result(server, samples, errors):
    base, images, captions, closed = server
    by_url = {s.url: s for s in samples}
    assert sorted(by_url) == sorted(base + p for p in images)
    for path, data in images.items():
        s = by_url[base + path]
        assert hashlib.sha256(s.jpg).hexdigest() == hashlib.sha256(data).hexdigest()  # bytes as served
        assert s.caption == captions[path].encode()
    kinds = {e.url: (e.stage, e.error_type) for e in errors}
    assert kinds == {base + "/missing.jpg": ("download", "failed_to_download"),
                     base + "/page.html": ("download", "failed_to_resize"),
                     closed: ("download", "failed_to_download")}
    messages = {e.url: e.error_message for e in errors}
    assert "404" in messages[base + "/missing.jpg"] and "refused" in messages[closed].lower()


def test_ingest_parquet_end_to_end(server, tmp_path):
    rows = url_rows(server)
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "urls.parquet")
    out = tmp_path / "raw"
    code, stdout, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "urls.parquet"), "--out", str(out),
                                    *IMG2DATASET])
    assert code == 0, stderr
    assert "successes" in stdout and f"{N_IMAGES:>10}" in stdout
    samples, errors = read_everything(str(out / "*.parquet"))
    check_result(server, samples, errors)


@pytest.mark.slow  # a second img2dataset run (~10 s); the tar + sidecar reader is covered in test_sources
def test_ingest_tsv_to_webdataset(server, tmp_path):
    rows = url_rows(server)
    (tmp_path / "urls.tsv").write_text("link\ttext\n" + "".join(f"{u}\t{c}\n" for u, c in rows))
    out = tmp_path / "raw"
    code, _, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "urls.tsv"), "--out", str(out),
                               "--output-format", "webdataset", "--url-col", "link", "--caption-col", "text",
                               *IMG2DATASET])
    assert code == 0, stderr
    assert sorted(p.suffix for p in out.glob("0*.*") if p.suffix in (".tar", ".parquet")).count(".tar") >= 1
    samples, errors = read_everything(str(out / "*"))  # tars, their sidecar parquets and stats json
    check_result(server, samples, errors)


def test_ingest_errors_name_file_and_option(tmp_path):
    (tmp_path / "urls.csv").write_text("address,caption\nhttp://x/1.jpg,a\n")
    code, _, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "o")])
    assert code == 2 and "urls.csv: no column 'url'" in stderr and "--url-col" in stderr
    code, _, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "o"),
                               "--url-col", "address", "--image_sise", "64"])
    assert code == 2 and "--image_sise is neither" in stderr
    code, _, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert code == 2 and "nope.csv: no such file" in stderr
    assert not (tmp_path / "o").exists()


def test_ingest_checks_json_lists_and_names_the_file_on_a_wrong_format(tmp_path):
    """Every format img2dataset reads with a header is checked before the download starts."""
    (tmp_path / "urls_nocap.jsonl").write_text('{"url": "http://x/1.jpg"}\n{"url": "http://x/2.jpg"}\n')
    code, _, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "urls_nocap.jsonl"),
                               "--out", str(tmp_path / "o")])
    assert code == 2, stderr
    assert "urls_nocap.jsonl: no column 'caption' (has ['url']); set --caption-col" in stderr
    (tmp_path / "urls.json").write_text('[{"link": "http://x/1.jpg", "caption": "a"}]')
    code, _, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "urls.json"), "--out", str(tmp_path / "o")])
    assert code == 2 and "urls.json: no column 'url' (has ['link', 'caption']); set --url-col" in stderr
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://x/1.jpg,a\n")
    code, _, stderr = run_cli(["ingest", "--url-list", str(tmp_path / "urls.csv"), "--out", str(tmp_path / "o"),
                               "--input-format", "parquet"])
    assert code == 2 and "urls.csv: cannot read it as a parquet URL list" in stderr
    assert not (tmp_path / "o").exists()


def test_list_columns_gzip_and_a_field_that_appears_late(tmp_path):
    with gzip.open(tmp_path / "urls.tsv.gz", "wt") as f:
        f.write("url\ttext\nhttp://x/1.jpg\ta\n")
    assert list_columns(str(tmp_path / "urls.tsv.gz"), "tsv.gz") == ["url", "text"]
    # past pyarrow's first 1 MiB block: the caption field appears only in the last row
    lines = [json.dumps({"url": f"http://example.invalid/{i:08d}.jpg"}) for i in range(30000)]
    (tmp_path / "late.jsonl").write_text("\n".join(lines + ['{"url": "http://x/y.jpg", "caption": "c"}']) + "\n")
    assert (tmp_path / "late.jsonl").stat().st_size > 1 << 20
    assert list_columns(str(tmp_path / "late.jsonl"), "jsonl", wanted=("url", "caption")) == ["url", "caption"]


def test_img2dataset_options_are_typed_from_its_signature():
    opts = parse_img2dataset_options(["--image_size", "64", "--resize-mode=no", "--skip_reencode",
                                      "--max_image_area", "inf", "--verify_hash", "sha256,md5",
                                      "--enable_wandb", "false", "--user_agent_token", "None"])
    assert opts == {"image_size": 64, "resize_mode": "no", "skip_reencode": True, "max_image_area": float("inf"),
                    "verify_hash": ["sha256", "md5"], "enable_wandb": False, "user_agent_token": None}
    with pytest.raises(ValueError, match="--image_size: 'big' is not a valid int"):
        parse_img2dataset_options(["--image_size", "big"])
    with pytest.raises(ValueError, match="--thread_count needs a value"):
        parse_img2dataset_options(["--thread_count"])
