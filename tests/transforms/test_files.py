"""capfilt.transforms.files: atomic writes, staged directory swaps, locks and hashes, including
what a kill -9 leaves behind (the children below SIGKILL themselves at a chosen point)."""
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import capfilt.transforms as transforms
from capfilt.transforms.files import atomic, hashing, locks
from capfilt.transforms.files.staging import Staging

ROOT = Path(transforms.__file__).resolve().parents[1]


def _run_child(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- atomic writes ---------------------------------------------------------------------------

def test_write_json_formats_and_reads_back(tmp_path):
    path = tmp_path / "a.json"
    assert atomic.write_json(path, {"b": 1, "a": [1, 2]}, indent=2, sort_keys=True, end="\n") is True
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    atomic.write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{"b": 1, "a": 2}'
    assert atomic.read_json(path) == {"b": 1, "a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temporary file left


def test_only_if_changed_leaves_an_identical_file_alone(tmp_path):
    path = tmp_path / "state.json"
    assert atomic.write_json(path, {"x": 1}, only_if_changed=True) is True
    os.utime(path, ns=(1, 1))
    assert atomic.write_json(path, {"x": 1}, only_if_changed=True) is False
    assert path.stat().st_mtime_ns == 1
    assert atomic.write_json(path, {"x": 2}, only_if_changed=True) is True
    assert atomic.read_json(path) == {"x": 2} and path.stat().st_mtime_ns != 1


def test_read_json_default_for_missing_or_broken_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"cut": ')
    for path in (tmp_path / "missing.json", broken):
        assert atomic.read_json(path, default=None) is None
    with pytest.raises(FileNotFoundError):
        atomic.read_json(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        atomic.read_json(broken)


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    atomic.write_text(path, "old")

    class Failing(atomic.LocalFiles):
        @contextlib.contextmanager
        def create(self, p):
            with super().create(p) as f:
                f.write(b"half")
                raise OSError("disk full")
                yield f

    with pytest.raises(OSError, match="disk full"):
        atomic.write_text(path, "new", Failing())
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_the_file_system_object_does_every_step(tmp_path):
    """Remote stores (Beam FileSystems in pipeline.files) plug in through the same five calls."""
    class Memory:
        def __init__(self):
            self.files, self.calls = {}, []

        def open(self, p):
            return io.BytesIO(self.files[p])

        @contextlib.contextmanager
        def create(self, p):
            self.calls.append(("create", p))
            buf = io.BytesIO()
            yield buf
            self.files[p] = buf.getvalue()

        def rename(self, src, dst):
            self.calls.append(("rename", src, dst))
            self.files[dst] = self.files.pop(src)

        def exists(self, p):
            return p in self.files

        def delete(self, p):
            del self.files[p]

    fs = Memory()
    atomic.write_json("s3://b/x.json", [1], fs, end="\n")
    assert fs.files == {"s3://b/x.json": b"[1]\n"}
    (_, tmp), (_, src, dst) = fs.calls
    assert tmp == src and dst == "s3://b/x.json" and atomic.is_temp(tmp) and tmp.startswith(dst)
    assert atomic.read_json("s3://b/x.json", fs) == [1]
    assert hashing.file_sha256("s3://b/x.json", fs) == hashlib.sha256(b"[1]\n").hexdigest()
    assert not (tmp_path / "s3:").exists()


KILLED_WRITER = r"""
import os, signal, sys
from capfilt.transforms.files import atomic

class Dying(atomic.LocalFiles):
    def rename(self, src, dst):
        os.kill(os.getpid(), signal.SIGKILL)  # after the data, before the rename: as kill -9

atomic.write_text(sys.argv[1], "new", Dying())
"""


def test_a_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path):
    path = tmp_path / "state.json"
    atomic.write_text(path, "old")
    child = _run_child(KILLED_WRITER, str(path))
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert path.read_text() == "old"  # whole
    leftovers = sorted(p for p in tmp_path.iterdir() if p.name != "state.json")
    assert len(leftovers) == 1 and leftovers[0].name.startswith("state.json.tmp-")
    assert leftovers[0].read_text() == "new"
    assert atomic.dead_temps(path) == [str(leftovers[0])]
    live = tmp_path / f"state.json.tmp-{os.getpid()}-0123abcd"  # a writer still at work
    live.write_text("")
    other = tmp_path / f"state.json.old.tmp-{_dead_pid()}-0123abcd"  # another file's temp
    other.write_text("")
    atomic.write_text(path, "newer")
    assert path.read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["state.json", live.name, other.name])


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """write(2) on a full disk names no file; the error that reaches the user does."""
    import errno

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    @contextlib.contextmanager
    def create(path):
        open(path, "wb").close()
        yield Full()

    monkeypatch.setattr(atomic.LOCAL, "create", create)
    path = tmp_path / "stats.json"
    with pytest.raises(OSError) as err:
        atomic.write_text(path, "{}")
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(path))
    assert str(err.value) == f"[Errno 28] No space left on device: '{path}'"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PermissionError) as err:  # the kind of error is kept
        with atomic.naming(path):
            raise OSError(errno.EACCES, "Permission denied")
    assert err.value.filename == str(path)


# --- hashes ----------------------------------------------------------------------------------

def test_hashes(tmp_path):
    assert hashing.bytes_sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert hashing.bytes_sha256(bytearray(b"abc")) == hashlib.sha256(b"abc").hexdigest()
    big = os.urandom((1 << 20) * 2 + 7)  # more than one read block
    (tmp_path / "big.bin").write_bytes(big)
    assert hashing.file_sha256(tmp_path / "big.bin") == hashlib.sha256(big).hexdigest()
    assert hashing.json_sha256({"b": 1, "a": [2]}) == hashing.json_sha256({"a": [2], "b": 1})
    assert hashing.json_sha256({}) == hashlib.sha256(b"{}").hexdigest()
    assert hashing.json_sha256([1]) != hashing.json_sha256([1.5])


def test_dir_sha256_names_and_bytes(tmp_path):
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"\x00\x01")
    expected = hashlib.sha256()
    for rel, data in (("config.json", b"{}"), ("sub/w.bin", b"\x00\x01")):
        expected.update(rel.encode() + b"\0" + hashlib.sha256(data).hexdigest().encode())
    assert hashing.dir_sha256(model) == hashing.dir_sha256(str(model)) == expected.hexdigest()
    (model / "sub" / "w.bin").rename(model / "sub" / "v.bin")
    assert hashing.dir_sha256(model) != expected.hexdigest()


# --- locks -----------------------------------------------------------------------------------

def test_a_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / ".lock"
    lock = locks.acquire(path)
    with pytest.raises(locks.Busy) as err:
        locks.acquire(path)
    assert err.value.path == str(path)
    with pytest.raises(KeyError, match="mine"):
        with locks.hold(path, busy=lambda: KeyError("mine")):
            pass
    lock.release()
    with locks.hold(path):
        with pytest.raises(locks.Busy):
            locks.acquire(path)
    locks.acquire(path).release()
    assert path.is_file()  # kept: deleting a locked file would split its waiters


HOLDER = r"""
import fcntl, sys, time
fh = open(sys.argv[1], "a")
fcntl.flock(fh, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_of_a_killed_process_is_free(tmp_path):
    path = tmp_path / ".lock"
    env = {**os.environ}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(locks.Busy):
            locks.acquire(path)
    finally:
        holder.kill()  # SIGKILL: the kernel releases its flock
        holder.wait()
    with locks.hold(path):
        with open(path, "a") as fh, pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the same OS lock as other flock users


# --- staged directories ----------------------------------------------------------------------

def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_swap_replaces_merges_and_a_failure_changes_nothing(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging = Staging(out)
    stage = staging.create()
    assert stage.parent == tmp_path and stage.name.startswith(".m.partial-%d-" % os.getpid())
    (stage / "new.txt").write_text("new")
    staging.discard()
    assert _names(tmp_path) == ["m"] and _names(out) == ["old.txt"]
    staging = Staging(out)
    (staging.create() / "new.txt").write_text("new")
    staging.swap(replace=False)
    assert _names(out) == ["new.txt", "old.txt"] and _names(tmp_path) == ["m"]
    staging = Staging(out)
    (staging.create() / "only.txt").write_text("x")
    staging.swap()
    assert _names(out) == ["only.txt"] and _names(tmp_path) == ["m"]


def test_create_names_the_failing_path(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "out"
    with pytest.raises(ValueError, match=rf"^cannot write x: creating {tmp_path}/file/\.out\.partial-\d+-\w+ failed"):
        Staging(out).create("cannot write x")
    with pytest.raises(OSError):
        Staging(out).create()


def test_leftovers_only_of_dead_runs_and_ours_are_removed(tmp_path):
    out = tmp_path / "w"
    dead = _dead_pid()

    def side(name, marker=True):
        path = tmp_path / name
        (path / "world").mkdir(parents=True)
        (path / "world" / "x").write_text("half")
        if marker:
            (path / "M").write_text("")
        return path

    killed = side(f".w.partial-{dead}-0123abcd")
    empty = tmp_path / f".w.partial-{dead}-4567abcd"  # killed before it was marked
    empty.mkdir()
    running = side(f".w.partial-{os.getpid()}-89abcdef")
    unmarked = side(f".w.partial-{dead}-fedcba98", marker=False)
    misnamed = side(".w.partial-mine")
    other_out = side(f".ww.partial-{dead}-0123abcd")
    removed = Staging(out, marker="M", inner="world").clean_leftovers()
    assert sorted(removed) == sorted([killed, empty])
    assert not killed.exists() and not empty.exists() and not out.exists()
    assert all(p.is_dir() for p in (running, unmarked, misnamed, other_out))
    # without a marker the name claims it (model directories)
    assert Staging(out).clean_leftovers() == [unmarked]


KILLED_SWAP = r"""
import os, pathlib, signal, sys
from capfilt.transforms.files.staging import Staging

out, inner = pathlib.Path(sys.argv[1]), sys.argv[2] or None
staging = Staging(out, marker="M" if inner else None, inner=inner)
(staging.create() / "new.txt").write_text("new")
real = pathlib.Path.replace
def dying(self, target):
    if pathlib.Path(target) == out:
        os.kill(os.getpid(), signal.SIGKILL)  # the previous out is parked, the new one not in place
    return real(self, target)
pathlib.Path.replace = dying
staging.swap()
"""


@pytest.mark.parametrize("inner", ["world", ""])  # marked, parked inside; unmarked, parked beside
def test_a_kill_inside_the_swap_is_undone_by_the_next_run(tmp_path, inner):
    out = tmp_path / "w"
    out.mkdir()
    (out / "old.txt").write_text("old")
    child = _run_child(KILLED_SWAP, str(out), inner)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert not out.exists()
    left = _names(tmp_path)
    assert len(left) == (1 if inner else 2) and all(n.startswith(".w.") for n in left), left
    Staging(out, marker="M" if inner else None, inner=inner or None).clean_leftovers()
    assert _names(tmp_path) == ["w"] and _names(out) == ["old.txt"]  # the previous out is back


def test_fixed_names_refuse_what_is_not_ours(tmp_path):
    out = tmp_path / "rel"
    finished = lambda p: (p / "manifest.json").is_file()  # noqa: E731
    staging = Staging(out, marker="M", unique=False, owned=finished)
    assert staging.stage == tmp_path / ".rel.partial" and staging.parked == tmp_path / ".rel.old"
    (tmp_path / ".rel.old").mkdir()
    (tmp_path / ".rel.old" / "mine.txt").write_text("z")
    assert staging.foreign() == [tmp_path / ".rel.old"]
    assert staging.clean_leftovers() == [] and (tmp_path / ".rel.old" / "mine.txt").is_file()
    (tmp_path / ".rel.old" / "mine.txt").unlink()
    (tmp_path / ".rel.old" / "manifest.json").write_text("{}")  # a parked release: put back
    (tmp_path / ".rel.partial").mkdir()  # empty: killed before it was marked
    assert staging.foreign() == []
    assert staging.clean_leftovers() == [tmp_path / ".rel.partial"]
    assert _names(tmp_path) == ["rel"] and _names(out) == ["manifest.json"]
    stage = staging.create()
    assert _names(stage) == ["M"]
    (stage / "manifest.json").write_text('{"new": 1}')
    staging.swap()
    assert _names(tmp_path) == ["rel"] and _names(out) == ["manifest.json"]  # marker removed
    assert json.loads((out / "manifest.json").read_text()) == {"new": 1}


KILLED_DELETE = r"""
import os, pathlib, signal, sys
from capfilt.transforms.files.staging import Staging

out = pathlib.Path(sys.argv[1])
staging = Staging(out, marker="M", unique=False, owned=lambda p: (p / "manifest.json").is_file())
(staging.create() / "manifest.json").write_text("new")
real = os.unlink
def dying(path, *args, **kwargs):
    if os.path.basename(path) != "M":  # the first deletion inside the parked previous out
        real(out.parent / f".{out.name}.old" / "manifest.json")
        os.kill(os.getpid(), signal.SIGKILL)  # its manifest is gone, its other files are not
    return real(path, *args, **kwargs)
os.unlink = dying
staging.swap()
"""


def test_a_kill_while_the_parked_out_is_deleted_is_finished_by_the_next_run(tmp_path):
    """Killed while deleting the previous out after the swap: what is left has lost the file
    that claimed it (a release's manifest.json); the next run must still know it as its own."""
    out = tmp_path / "rel"
    (out / "shards").mkdir(parents=True)
    for name in ("manifest.json", "report.html", "shards/part-00000.parquet", "shards/part-00001.parquet"):
        (out / name).write_text("old")
    child = _run_child(KILLED_DELETE, str(out))
    assert child.returncode == -signal.SIGKILL, child.stderr
    parked = tmp_path / ".rel.old"
    assert (out / "manifest.json").read_text() == "new"
    assert not (parked / "manifest.json").exists() and len(list(parked.rglob("*"))) > 1  # half deleted
    staging = Staging(out, marker="M", unique=False, owned=lambda p: (p / "manifest.json").is_file())
    assert staging.foreign() == []  # not "in the way"
    assert staging.clean_leftovers() == [parked]
    assert _names(tmp_path) == ["rel"] and _names(out) == ["manifest.json"]


def test_a_directory_claimed_for_deletion_is_never_put_back(tmp_path):
    """A kill while deleting leaves the claim (DELETING) with the rest; even with ``out`` gone,
    such a directory is deleted, not renamed back as ``out``."""
    from capfilt.transforms.files.staging import DELETING

    out = tmp_path / "rel"
    parked = tmp_path / ".rel.old"
    (parked / "shards").mkdir(parents=True)
    (parked / "shards" / "part-00001.parquet").write_text("half")
    (parked / DELETING).write_text("")
    staging = Staging(out, marker="M", unique=False, owned=lambda p: (p / "manifest.json").is_file())
    assert staging.foreign() == [] and staging.clean_leftovers() == [parked]
    assert _names(tmp_path) == []


def test_a_marker_with_unique_names_must_park_inside(tmp_path):
    with pytest.raises(ValueError, match="needs inner"):
        Staging(tmp_path / "w", marker="M")


# --- outputs: what wrote a directory -------------------------------------------------------------

@pytest.mark.parametrize("files, kind, what", [
    ({"_state/settings.json": "{}", "manifest.json": "{}"}, "curate", "a capfilt curate output"),
    ({"manifest.json": '{"format": "capfilt-release/1"}'}, "release", "a capfilt release (manifest.json format capfilt-release/1)"),
    ({".capfilt-ingest/settings.json": "{}"}, "ingest", "a capfilt ingest output"),
    ({"00000_stats.json": "{}", "00000.parquet": ""}, "ingest", "an img2dataset download (it has 00000_stats.json)"),
    ({"synth_config.json": "{}", "web/00000.parquet": ""}, "synth", "a synthetic world"),
    ({"config.json": '{"architectures": ["BlipForImageTextRetrieval"]}'}, "model", "a model directory (BlipForImageTextRetrieval)"),
    ({"open_clip_config.json": "{}"}, "model", "an open_clip model directory"),
    ({"pretrain_log.jsonl": ""}, "training", "a pretrain or finetune output"),
    ({"stages/x.json": "{}", "report.json": "{}"}, "bootstrap", "a capfilt bootstrap output"),
    ({"run-job-state.json": "{}"}, "run-job", "a capfilt run-job root"),
    ({"manifest.json": '{"kind": "other"}', "config.json": "{}", "notes.txt": ""}, None, None),
])
def test_outputs_identify_names_the_command_that_wrote_a_directory(tmp_path, files, kind, what):
    from capfilt.transforms.files import outputs

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = outputs.identify(tmp_path)
    assert (found and found.kind) == kind
    assert found is None or found.what.startswith(what)
    if kind not in (None, "release"):
        with pytest.raises(ValueError, match=f"is {re.escape(what)}.*, not a release; release writes only"):
            outputs.check_own(tmp_path, outputs.RELEASE, "release")


# --- modes: the umask --------------------------------------------------------------------------

def test_respect_umask_gives_files_the_mode_open_would(tmp_path, umask):
    from capfilt.transforms.files import modes

    assert modes.umask() == umask and modes.file_mode() == 0o666 & ~umask
    (tmp_path / "sub").mkdir()
    private = os.open(tmp_path / "sub" / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(private)
    (tmp_path / "config.json").write_text("{}")
    outside = tmp_path.parent / f"{tmp_path.name}-target"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    (tmp_path / "link").symlink_to(outside)
    modes.respect_umask(tmp_path)
    assert os.stat(tmp_path / "sub" / "weights.safetensors").st_mode & 0o777 == 0o666 & ~umask
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o666 & ~umask
    assert os.stat(outside).st_mode & 0o777 == 0o600  # a link's target is not ours
