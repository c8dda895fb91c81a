"""A local S3 for tests: moto's server on 127.0.0.1 (a free port), one bucket, and the Beam
options that point Beam's ``s3://`` file system at it; plus copying a local folder to
``s3://`` and back through Beam's ``FileSystems``.

Nothing here reaches another address: the AWS variables are set to dummy values for the
server's lifetime, so boto3 neither reads a developer's credentials or profile nor asks an
instance-metadata service. botocore addresses buckets path-style (``http://IP:PORT/bucket/key``)
when the endpoint is an IP address, so Beam needs no option for that.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REGION = "us-east-1"  # the one region whose CreateBucket takes no location constraint
KEY_ID = SECRET = "testing"

# Variables that make boto3 look for real credentials, profiles, endpoints or a metadata service.
_CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
_DUMMY = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION,
          "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
          "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@dataclass(frozen=True)
class S3Server:
    """A running local S3 with one empty-at-start bucket."""

    endpoint_url: str  # http://127.0.0.1:PORT
    bucket: str

    @property
    def args(self) -> list[str]:
        """Beam pipeline arguments (S3Options) that reach this server."""
        return [f"--s3_endpoint_url={self.endpoint_url}", f"--s3_access_key_id={KEY_ID}",
                f"--s3_secret_access_key={SECRET}", f"--s3_region_name={REGION}"]

    def url(self, key: str = "") -> str:
        """``s3://BUCKET/KEY``."""
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def use(self) -> None:
        """Point Beam's ``FileSystems`` (outside a pipeline) at this server."""
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.pipeline_options import PipelineOptions

        FileSystems.set_options(PipelineOptions(self.args))

    def boto3_client(self):
        """A boto3 S3 client on this server, for checks that go around Beam."""
        import boto3

        return boto3.session.Session().client("s3", region_name=REGION, endpoint_url=self.endpoint_url,
                                              aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)


@contextlib.contextmanager
def s3_server(bucket: str = "capfilt-test") -> Iterator[S3Server]:
    """Start moto's S3 on 127.0.0.1, create ``bucket``, and point Beam's ``FileSystems`` at it;
    on exit stop the server, reset ``FileSystems`` and restore the environment."""
    import pytest
    from apache_beam.io.filesystems import FileSystems
    from moto.server import ThreadedMotoServer

    requests_log = logging.getLogger("werkzeug")  # the server logs every request at INFO
    level = requests_log.level
    with pytest.MonkeyPatch.context() as env:
        requests_log.setLevel(logging.WARNING)
        for name in _CLEARED:
            env.delenv(name, raising=False)
        for name, value in _DUMMY.items():
            env.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            s3 = S3Server(endpoint_url=f"http://{host}:{port}", bucket=bucket)
            s3.boto3_client().create_bucket(Bucket=bucket)
            s3.use()
            yield s3
        finally:
            FileSystems.set_options(None)
            server.stop()
            requests_log.setLevel(level)


def upload_dir(local: str | os.PathLike, url: str) -> list[str]:
    """Copy every file under local folder ``local`` to ``url/RELATIVE/PATH`` through Beam's
    ``FileSystems``; returns the written URLs, sorted."""
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    root = Path(local)
    written = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        dest = f"{url.rstrip('/')}/{path.relative_to(root).as_posix()}"
        with open(path, "rb") as src, FileSystems.create(dest, compression_type=CompressionTypes.UNCOMPRESSED) as out:
            shutil.copyfileobj(src, out)
        written.append(dest)
    return written


def download_dir(url: str, local: str | os.PathLike) -> list[Path]:
    """Copy every object under ``url/`` to local folder ``local`` (keeping the relative paths)
    through Beam's ``FileSystems``; returns the written files, sorted."""
    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    prefix = url.rstrip("/") + "/"
    (result,) = FileSystems.match([prefix + "**"])
    written = []
    for meta in sorted(result.metadata_list, key=lambda m: m.path):
        dest = Path(local) / meta.path[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileSystems.open(meta.path, compression_type=CompressionTypes.UNCOMPRESSED) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
        written.append(dest)
    return written
