"""Raw shards in tests: a webdataset tar written member by member, and a shard read as the
curate graph reads it, without a pipeline (pipeline/curate/sources.py)."""
import io
import tarfile

from capfilt.pipeline.curate.errors import StageError, dead_letter_to_error
from capfilt.pipeline.curate.sources import ReadShardFn, to_sample


def read_shard(info):
    """ReadShardFn.process, then to_sample as ReadRows runs it: (samples, error rows)."""
    samples, errors = [], []
    for raw in ReadShardFn().process(info):
        try:
            samples.append(to_sample(raw))
        except StageError as err:
            errors.append(dead_letter_to_error((raw, (StageError, repr(err), [])), "read"))
    return samples, errors


LINKS = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}


def write_tar(path, members):
    """A tar of (member name, bytes) in the given order (repeats allowed); (member name,
    ("symlink" or "hardlink", target)) adds a link member."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = LINKS[data[0]], data[1]
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
