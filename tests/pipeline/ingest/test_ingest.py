"""`capfilt ingest` end to end against an HTTP server on 127.0.0.1 (a thread in this test,
`ingest_data.image_server`) that serves the synthetic images, 404s and an HTML page, plus a URL
on a closed port (refused); a `kill -9` mid-download; and, with stand-ins for img2dataset's `download` that write its layout
and then break it, the checks of its output, the lock on --out and resuming."""
import contextlib
import fcntl
import gzip
import hashlib
import importlib
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipeline.ingest.download import list_columns, parse_img2dataset_options
from capfilt.pipeline.curate.sources import discover_shards, validate_shard
from shard_data import read_shard
from cli_run import error_line, run_cli
from ingest_data import IMG2DATASET, N_IMAGES, processes_with, url_rows, wait_for


def read_everything(pattern):
    samples, errors = [], []
    for info in (validate_shard(s) for s in discover_shards([pattern])):
        shard_samples, shard_errors = read_shard(info)
        samples += shard_samples
        errors += shard_errors
    return samples, errors


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


# --- a kill -9 mid-download ----------------------------------------------------------------------

def test_kill_9_mid_download_leaves_no_process_and_the_rerun_converges(server, tmp_path):
    """The crash audit's case: img2dataset's logger and pool workers outlived a killed capfilt
    and kept writing; the re-run then shared shard files with them."""
    base, images, captions, closed = server
    rows = [(base + "/slow" + path, captions[path]) for path in images] * 2
    rows += [(base + "/slow/missing.jpg", "a 404"), (base + "/slow/missing2.jpg", "another 404")]
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), tmp_path / "urls.parquet")
    out = tmp_path / "raw"
    argv = ["ingest", "--url-list", str(tmp_path / "urls.parquet"), "--out", str(out), "--processes_count", "1",
            "--thread_count", "2", "--retries", "0", "--resize_mode", "no", "--skip-reencode",
            "--number_sample_per_shard", "4"]
    marker = f"CAPFILT_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    log = open(tmp_path / "killed.log", "wb")
    cli = "import sys; from capfilt.jobs.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", cli, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).parents[3])
    try:
        # kill once the first shard is finished: the second one is being written
        wait_for(lambda: (out / "00000_stats.json").exists() or proc.poll() is not None, "the first shard")
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not processes_with(marker), "the killed ingest's processes to end", deadline_s=60)
        assert processes_with(marker) == []
    finally:
        log.close()
        for pid in processes_with(marker):  # the old behaviour: don't leave them running
            os.kill(pid, signal.SIGKILL)

    code, stdout, stderr = run_cli(argv)
    assert code == 0, stderr
    assert f"{len(rows):>10}" in stdout and "url list rows" in stdout
    table = pq.read_table(sorted(out.glob("*.parquet")), columns=["key", "url", "status", "jpg"]).to_pylist()
    assert sorted(r["key"] for r in table) == [f"{10 * s + i:06d}" for s in range(3) for i in range(4)]
    by_key = {r["key"]: r for r in table}
    for n, (url, _) in enumerate(rows):  # each URL once, under its key, with the bytes served
        got = by_key[f"{10 * (n // 4) + n % 4:06d}"]
        assert got["url"] == url
        path = url[len(base) + len("/slow"):]
        if path in images:
            assert got["status"] == "success" and got["jpg"] == images[path]
        else:
            assert got["status"] == "failed_to_download" and got["jpg"] is None


# --- img2dataset stand-ins: its layout, then a defect --------------------------------------------
# `capfilt ingest` calls `img2dataset.download` (looked up when it runs, so monkeypatch works);
# these stand-ins run where it would (a spawned process), so they are module-level functions.

PER_SHARD = 4
N_URLS = 10  # shards 00000, 00001 of 4 rows, 00002 of 2


def _img2dataset_layout(kw):
    """Shards as img2dataset writes them for a parquet URL list, every row a failed download (no
    network): ``NNNNN.parquet`` with key/url/caption/status/error_message/jpg, ``NNNNN_stats.json``.
    Shards that have stats are skipped (its incremental mode)."""
    urls = pq.read_table(kw["url_list"]).column(kw.get("url_col", "url")).to_pylist()
    per, out = kw.get("number_sample_per_shard", 10000), Path(kw["output_folder"])
    out.mkdir(parents=True, exist_ok=True)
    done = {int(p.name.split("_")[0]) for p in out.glob("*.json")}
    digits = math.ceil(math.log10(per))
    for shard in range(math.ceil(len(urls) / per)):
        if shard in done and kw.get("incremental_mode", "incremental") == "incremental":
            continue
        part = urls[shard * per:(shard + 1) * per]
        n = len(part)
        pq.write_table(pa.table({"key": [f"{10 ** digits * shard + i:0{digits + 5}d}" for i in range(n)], "url": part,
                                 "caption": ["c"] * n, "status": ["failed_to_download"] * n,
                                 "error_message": ["HTTP Error 404: Not Found"] * n, "jpg": pa.nulls(n, pa.binary())}),
                       out / f"{shard:05d}.parquet")
        (out / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": n, "successes": 0, "failed_to_download": n, "failed_to_resize": 0,
             "status_dict": {"HTTP Error 404: Not Found": n}}))


def _rewrite(path, change):
    pq.write_table(change(pq.read_table(path)), path)


def download_clean(**kw):
    _img2dataset_layout(kw)


def download_truncating_a_shard(**kw):
    """A shard a foreign process was still writing: no footer."""
    _img2dataset_layout(kw)
    shard = Path(kw["output_folder"]) / "00001.parquet"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])


def download_losing_a_row(**kw):
    """The parquet lacks a row its stats count."""
    _img2dataset_layout(kw)
    _rewrite(Path(kw["output_folder"]) / "00001.parquet", lambda t: t.slice(0, t.num_rows - 1))


def download_giving_up_a_shard(**kw):
    """img2dataset's download returns normally when a shard failed max_shard_retry times."""
    _img2dataset_layout(kw)
    (Path(kw["output_folder"]) / "00001_stats.json").unlink()


def download_dropping_a_url(**kw):
    """A shard consistent with its stats, but one URL of the list short."""
    _img2dataset_layout(kw)
    out = Path(kw["output_folder"])
    _rewrite(out / "00001.parquet", lambda t: t.slice(0, t.num_rows - 1))
    stats = json.loads((out / "00001_stats.json").read_text())
    stats.update(count=3, failed_to_download=3)
    (out / "00001_stats.json").write_text(json.dumps(stats))


def download_mixing_up_urls(**kw):
    """Right counts and keys, but two rows hold each other's URL."""
    _img2dataset_layout(kw)

    def swap(t):
        urls = t.column("url").to_pylist()
        urls[0], urls[1] = urls[1], urls[0]
        return t.set_column(t.schema.get_field_index("url"), "url", pa.array(urls))
    _rewrite(Path(kw["output_folder"]) / "00001.parquet", swap)


def _real_download():
    return importlib.import_module("img2dataset.main").download  # the package's `main` is a function


for _fake in (download_clean, download_truncating_a_shard, download_losing_a_row, download_giving_up_a_shard,
              download_dropping_a_url, download_mixing_up_urls):
    _fake.__signature__ = inspect.signature(_real_download())  # capfilt types options from it


@pytest.fixture
def url_list(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://example.invalid/{i}.jpg" for i in range(N_URLS)],
                             "caption": [f"caption {i}" for i in range(N_URLS)]}), path)
    return path


def ingest_with(monkeypatch, fake, url_list, out, *extra):
    import img2dataset

    monkeypatch.setattr(img2dataset, "download", fake)
    return run_cli(["ingest", "--url-list", str(url_list), "--out", str(out),
                    "--number_sample_per_shard", str(PER_SHARD), *extra])


@pytest.mark.parametrize("fake, message", [
    (download_truncating_a_shard, "00001.parquet: not a readable parquet file"),
    (download_losing_a_row, "00001.parquet: 3 rows, but 00001_stats.json records 4 (successes 0 + "
                            "failed_to_download 4 + failed_to_resize 0)"),
    (download_giving_up_a_shard, "00001_stats.json: missing, img2dataset did not finish shard 00001"),
    (download_dropping_a_url, "00001_stats.json: count 3, but the URL list puts 4 row(s) in shard 00001"),
    (download_mixing_up_urls, "00001.parquet: key 000010 has url 'http://example.invalid/5.jpg', "
                              "but the URL list has 'http://example.invalid/4.jpg'"),
])
def test_output_that_does_not_hold_the_url_list_is_an_error(monkeypatch, url_list, tmp_path, fake, message):
    code, stdout, stderr = ingest_with(monkeypatch, fake, url_list, tmp_path / "raw")
    assert code == 2, (stdout, stderr)
    assert "capfilt ingest: error:" in stderr and message in stderr
    assert f"the URL list's {N_URLS} row(s) (3 shard(s) of {PER_SHARD})" in stderr
    assert "successes" not in stdout


def _boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def test_a_live_process_group_of_a_killed_ingest_refuses_the_run(monkeypatch, url_list, tmp_path):
    """The lock records the process group that runs img2dataset; while a process of it lives,
    a new ingest into the same --out refuses to start and names it."""
    out = tmp_path / "raw"
    (out / ".capfilt-ingest").mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        (out / ".capfilt-ingest" / "lock").write_text(json.dumps(
            {"pid": 999999, "pgid": orphan.pid, "boot_id": _boot_id()}))
        code, stdout, stderr = ingest_with(monkeypatch, download_clean, url_list, out)
        assert code == 2, (stdout, stderr)
        assert (f"another ingest is still running in {out}: pid(s) {orphan.pid} of process group {orphan.pid}, "
                f"started by capfilt ingest pid 999999" in stderr)
        assert f"wait for it or kill it (kill -9 -- -{orphan.pid})" in stderr
        assert not list(out.glob("0*"))  # nothing downloaded
    finally:
        orphan.kill()
        orphan.wait()
    code, _, stderr = ingest_with(monkeypatch, download_clean, url_list, out)
    assert code == 0, stderr
    assert len(list(out.glob("*.parquet"))) == 3


def test_a_running_ingest_holds_the_lock(monkeypatch, url_list, tmp_path):
    out = tmp_path / "raw"
    (out / ".capfilt-ingest").mkdir(parents=True)
    with open(out / ".capfilt-ingest" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(json.dumps({"pid": 4242, "pgid": None}))
        held.flush()
        code, _, stderr = ingest_with(monkeypatch, download_clean, url_list, out)
        assert code == 2 and f"another capfilt ingest (pid 4242) is still running in {out}: wait for it" in stderr
        assert not list(out.glob("0*"))
    code, _, stderr = ingest_with(monkeypatch, download_clean, url_list, out)
    assert code == 0, stderr


def test_resume_downloads_broken_shards_again_and_refuses_other_settings(monkeypatch, url_list, tmp_path):
    """What a killed run leaves: a shard cut short (its stats written by a foreign process), stats
    cut short, a shard without stats. img2dataset's incremental mode alone would keep the first two."""
    out = tmp_path / "raw"
    assert ingest_with(monkeypatch, download_clean, url_list, out)[0] == 0
    ref = pq.read_table(sorted(out.glob("*.parquet"))).sort_by("key")
    (out / "00000.parquet").write_bytes((out / "00000.parquet").read_bytes()[:100])
    (out / "00001_stats.json").write_text((out / "00001_stats.json").read_text()[:20])
    (out / "00002_stats.json").unlink()
    code, stdout, stderr = ingest_with(monkeypatch, download_clean, url_list, out)
    assert code == 0, stderr
    assert "downloaded again: 00000, 00001, 00002" in stdout
    assert pq.read_table(sorted(out.glob("*.parquet"))).sort_by("key").equals(ref)
    code, _, stderr = ingest_with(monkeypatch, download_clean, url_list, out, "--image_size", "64")
    assert code == 2 and "holds a download made with other settings (image_size 256 -> 64)" in stderr
    code, _, stderr = ingest_with(monkeypatch, download_clean, url_list, out, "--image_size", "64",
                                  "--incremental_mode", "overwrite")
    assert code == 0, stderr


@pytest.mark.parametrize("mode", [[], ["--incremental_mode", "overwrite"], ["--incremental_mode", "extend"]])
def test_a_directory_another_command_wrote_is_refused_in_every_mode(monkeypatch, url_list, tmp_path, mode):
    curated = tmp_path / "curated"
    (curated / "_state").mkdir(parents=True)
    (curated / "_state" / "settings.json").write_text("{}")
    (curated / "shards").mkdir()
    (curated / "shards" / "part-00000.parquet").write_bytes(b"curated rows")
    code, stdout, stderr = ingest_with(monkeypatch, download_clean, url_list, curated, *mode)
    assert code == 2 and stdout == ""
    assert error_line(stderr, "ingest") == (
        f"capfilt ingest: error: --out {curated} is a capfilt curate output (it has _state/settings.json), not an "
        f"ingest output; ingest writes only into an empty directory or an ingest output, whatever the flags: "
        f"choose another --out")
    assert sorted(str(p.relative_to(curated)) for p in curated.rglob("*")) == [
        "_state", "_state/settings.json", "shards", "shards/part-00000.parquet"]
