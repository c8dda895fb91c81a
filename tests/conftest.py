"""Test-wide settings: offline hub, quiet albumentations, one torch thread per test process
(the CI machine has 2 cores), and shared fixtures for the synthetic world and tiny models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; excluded from `make test`")


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    """The process umask set to 022, then 002, for the test (restored after it)."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


# --- tiny models and the synthetic world (model/builders/tiny.py, transforms/synth*.py) ---------------
# Session-scoped: built once per test run into pytest's temporary directory, then shared.
# Tests must not modify these directories; copy them first (shutil.copytree) if they must.

@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """Directory of the BLIP-layout WordPiece tokenizer trained on the synthetic corpus."""
    from capfilt.model.builders.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """{kind: model directory} for "captioner", "itm", "blip2-itm" and "clip" (seed 0).
    BLIP kinds load with `from_pretrained(dir)`; clip with
    `open_clip.create_model_and_transforms("local-dir:" + str(dir))`."""
    from capfilt.model.builders.tiny import KINDS, init_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: init_model(kind, root / kind, tokenizer_dir=tiny_tokenizer, seed=0) for kind in KINDS}


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """A small synthetic world (seed 0): web 48 rows (45% noisy, 2 shards of 32 + 16),
    human 16, test 16, 64 px. Layout: <dir>/{web,human,test}/*.parquet + <dir>/truth.parquet."""
    from capfilt.transforms.synth.world import SynthConfig, write_world

    out = tmp_path_factory.mktemp("synth_world")
    write_world(out, SynthConfig(n=48, human=16, test=16, noise=0.45, seed=0, rows_per_shard=32))
    return out


# --- a local S3 (tests/s3_server.py) ------------------------------------------------------------------
# One moto server on 127.0.0.1 for the whole run; each test gets its own prefix in the bucket.

@pytest.fixture(scope="session")
def s3_server():
    """A running local S3 (`s3_server.S3Server`: endpoint_url, bucket, args for Beam, url(key));
    Beam's FileSystems point at it. Stopped at the end of the run."""
    from s3_server import s3_server as start

    with start() as server:
        yield server


@pytest.fixture
def s3_root(s3_server, request):
    """``s3://BUCKET/TEST-NAME``: a prefix no other test writes under. Re-points Beam's
    FileSystems at the server (a Beam pipeline run in between may have changed its options)."""
    s3_server.use()
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in request.node.nodeid)
    return s3_server.url(name).rstrip("/")
