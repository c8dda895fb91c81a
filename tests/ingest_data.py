"""`capfilt ingest` in tests: an HTTP server on 127.0.0.1 (a thread) serving synthetic images, 404s
and an HTML page, a URL list over it with a refused URL, and the processes a run left behind."""
import contextlib
import http.server
import os
import socket
import threading
import time

import pyarrow.parquet as pq

N_IMAGES = 5
IMG2DATASET = ["--processes_count", "1", "--thread_count", "4", "--timeout", "5", "--retries", "0",
               "--resize_mode", "no", "--skip-reencode", "--number_sample_per_shard", "4"]


@contextlib.contextmanager
def image_server(synth_world):
    """(base url, {path: image bytes}, {path: caption}, closed-port url); shut down on exit."""
    rows = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0]).slice(0, N_IMAGES).to_pylist()
    images = {f"/img/{r['key']}.jpg": r["jpg"] for r in rows}
    captions = {f"/img/{r['key']}.jpg": r["caption"] for r in rows}

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10  # a stuck client cannot hold a server thread

        def do_GET(self):
            path = self.path
            if path.startswith("/slow/"):  # slow enough to kill a download midway
                time.sleep(0.4)
                path = path[len("/slow"):]
            if path in images:
                self._send(200, "image/jpeg", images[path])
            elif path == "/page.html":
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
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", images, captions, closed
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def url_rows(server):
    """(url, caption) of every image, then a 404, an HTML page and a refused URL."""
    base, images, captions, closed = server
    rows = [(base + path, captions[path]) for path in images]
    rows += [(base + "/missing.jpg", "a 404"), (base + "/page.html", "an html page"), (closed, "refused")]
    return rows


def processes_with(marker):
    """Live (not zombie) pids, other than this one, whose environment holds ``marker``: a
    process started with it and every process it started, wherever they were re-parented."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in env and state not in ("Z", "X") and int(pid) != os.getpid():
            found.append(int(pid))
    return found


def wait_for(condition, what, deadline_s=120):
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what} after {deadline_s} s")
        time.sleep(0.02)
