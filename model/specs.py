"""Model specs: the one parser of what a user writes for a model, and a model's identity.

A spec is one string. ``ModelSpec.parse`` reads it into a frozen ``ModelSpec`` whose ``kind``
is one of:

* ``local``: ``local-dir:DIR`` (open_clip's own scheme), ``hf:DIR`` (a transformers
  directory, for ``--vision-init``), or a path (``/m``, ``./m``, ``models/m``): a file or
  directory that exists or is written as a path (see "Local or hub" below);
* ``open_clip_hub``: ``hf-hub:ORG/REPO``, an open_clip model on the hub;
* ``open_clip``: ``NAME:PRETRAINED`` or ``open_clip:NAME:PRETRAINED``, an open_clip
  architecture plus a pretrained tag or weights file (``ViT-L-14:openai``);
* ``timm``: ``timm:NAME[:FILE]``, a timm model with FILE's weights, else its pretrained tag's;
* ``remote``: ``s3://...``, ``gs://...`` (any ``SCHEME://``), a model directory on object
  storage. Curate copies it once per worker into a local cache, checked by content hash
  (``capfilt.pipeline.models``); other commands take local directories and hub ids only;
* ``hub``: anything else, a transformers hub id (``NAME`` or ``ORG/NAME``).

Which kinds a role takes is checked where the role is: ``parse_clip`` (the ranker, release:
a local directory, ``hf-hub:`` or ``NAME:PRETRAINED``), ``parse_vision_init`` (pretraining's
``--vision-init``: ``timm:``, ``open_clip:`` or ``hf:``); a transformers model (captioner,
filter, ``--init``) is a local directory or anything else passed to ``from_pretrained``,
whose own error then names it. ``check_model_dir`` / ``check_clip_dir`` turn every way a
local directory can be missing or broken into a ValueError naming the path.

Local or hub. Hub ids are ``NAME`` or ``ORG/NAME`` and open_clip specs hold a ':', so a spec
that exists, starts with '.', '/' or '~', holds a backslash (the Windows separator) or two
'/' is a path. Relative to a job file (``base``), a spec whose first part is a directory
beside the file (``models/captionr`` when ``models/`` exists) is a misspelt path too: an org
of that name beside the job file is far less likely than a typo. Against the working
directory, which holds whatever it holds, such a spec stays a hub id, but it is ambiguous
(``ModelSpec.shadow``: the path it would name): when the hub has no such model the error
names both readings, the missing directory first, with the closest entry of its folder
(``no such directory trained/captionr (did you mean trained/captioner?); ...``).

Identity (``identity``): what a manifest records for a model: its spec as written, and the
SHA-256 over a local directory's files (relative path + content hash of each, in walk order)
or of a local weights file (``transforms.files.hashing``); a hub id or pretrained tag has none.
A directory that ``capfilt models init`` wrote holds ``capfilt_model.json`` with ``"trained":
false`` (its weights are random); its record says ``"untrained": true``. Training writes its
models with the libraries' own ``save_pretrained`` / safetensors into new directories, which
have no such file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from capfilt.transforms.files.hashing import dir_sha256, file_sha256

LOCAL, HUB, OPEN_CLIP, OPEN_CLIP_HUB, TIMM, REMOTE = "local", "hub", "open_clip", "open_clip_hub", "timm", "remote"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SCHEMES = {"local-dir": LOCAL, "hf": LOCAL, "hf-hub": OPEN_CLIP_HUB, "open_clip": OPEN_CLIP, "timm": TIMM}
VISION_INIT_SCHEMES = ("timm", "open_clip", "hf")

CLIP_CONFIG = "open_clip_config.json"  # what makes a directory an open_clip model
MODEL_RECORD = "capfilt_model.json"  # written by capfilt's builders beside the weights (``untrained``)
CLIP_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Files a transformers model directory holds its weights in (single file or sharded).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Files that make a directory loadable by AutoProcessor: an image processor plus a tokenizer.
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec. ``name``: the path (local, made absolute against ``base`` when one was
    given), the hub id, or the architecture; ``weights``: the open_clip pretrained tag or file,
    or timm's weights file; ``scheme``: the prefix it was written with, if any."""

    text: str  # as written
    kind: str
    name: str
    weights: str | None = None
    scheme: str = ""
    shadow: str | None = None  # a hub id ORG/NAME whose ORG is a local directory: the path it names

    @classmethod
    def parse(cls, spec: str | Path, base: str | Path | None = None) -> "ModelSpec":
        """The spec's kind and parts (table in the module docstring). ``base``: the directory
        relative paths are relative to (a job file's), else the working directory."""
        text = str(spec)
        if _URL.match(text):  # s3://, gs://, ...: a directory on object storage
            return cls(text, REMOTE, text.rstrip("/"), scheme=text.split(":", 1)[0])
        scheme, sep, rest = text.partition(":")
        if sep and scheme in _SCHEMES:
            kind = _SCHEMES[scheme]
            if kind == LOCAL:
                return cls(text, kind, _resolve(rest, base) if rest else "", scheme=scheme)
            if kind == OPEN_CLIP_HUB:
                return cls(text, kind, rest, scheme=scheme)
            name, _, weights = rest.partition(":")
            return cls(text, kind, name, weights or None, scheme)
        if _is_path(text, base):
            return cls(text, LOCAL, _resolve(text, base))
        name, sep, weights = text.partition(":")
        if sep and name and weights:
            return cls(text, OPEN_CLIP, name, weights)
        first = text.split("/")[0]
        shadowed = "/" in text and first and (Path(base or ".") / first).is_dir()
        return cls(text, HUB, text, shadow=_resolve(text, base) if shadowed else None)

    def both_readings(self, hub_error: str) -> str:
        """The error of an ambiguous hub id (``shadow``) that the hub did not resolve: the
        missing directory first, then the hub's answer."""
        return (f"no such directory {self.shadow}{near_miss(Path(self.shadow))}; read as a hub id, "
                f"{self.text!r} failed too ({hub_error})")

    @property
    def local(self) -> bool:
        return self.kind == LOCAL

    @property
    def remote(self) -> bool:
        return self.kind == REMOTE

    @property
    def path(self) -> Path | None:
        """The local file or directory; None for a spec that names no local path."""
        return Path(self.name) if self.local else None

    def __str__(self) -> str:
        """The spec as written, with a local path as resolved (absolute against ``base``)."""
        if not self.local:
            return self.text
        return f"{self.scheme}:{self.name}" if self.scheme else self.name


def _resolve(text: str, base) -> str:
    path = Path(text).expanduser()
    return str(path if base is None or path.is_absolute() else Path(base) / path)


def _is_path(text: str, base) -> bool:
    """Whether a spec with no scheme names a local path (module docstring: local or hub)."""
    if Path(_resolve(text, base)).exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    if ":" in text:  # NAME:PRETRAINED
        return False
    if text.count("/") > 1:
        return True
    return base is not None and "/" in text and (Path(base) / text.split("/")[0]).is_dir()


def near_miss(path: Path) -> str:
    """" (did you mean P?)" for the entry of ``path``'s folder closest to its name, else ""."""
    import difflib

    try:
        names = sorted(p.name for p in path.parent.iterdir())
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


def absolute_spec(spec: str) -> str:
    """``spec`` with its local path (a directory, or an open_clip/timm weights file) made
    absolute against the working directory; a hub id or pretrained tag as written. A process
    elsewhere (a Beam worker) resolves it to the same files."""
    parsed = ModelSpec.parse(spec)
    if parsed.local and parsed.name:
        return str(dataclasses.replace(parsed, name=os.path.abspath(parsed.name)))
    if parsed.kind in (OPEN_CLIP, TIMM) and parsed.weights and os.path.isfile(os.path.expanduser(parsed.weights)):
        weights = os.path.abspath(os.path.expanduser(parsed.weights))
        return ":".join(p for p in (parsed.scheme, parsed.name, weights) if p)
    return str(spec)


def is_local_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names a local file or directory rather than a hub model."""
    return ModelSpec.parse(spec).local


# --- local directories ---------------------------------------------------------------------

def check_model_dir(path: str | Path, *, need_processor: bool = True) -> Path:
    """Raise ValueError naming ``path`` and the missing/broken part unless it is a loadable
    transformers directory (with processor files when ``need_processor``)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"model directory {root} does not exist: no such directory{near_miss(root)}")
    if not root.is_dir():
        raise ValueError(f"model path {root} is a file, expected a directory from save_pretrained")
    config = root / "config.json"
    if not config.is_file():
        raise ValueError(f"model directory {root} has no config.json")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model directory {root}: config.json is not valid JSON ({exc})") from exc
    if not any((root / name).is_file() for name in HF_WEIGHT_FILES):
        raise ValueError(f"model directory {root} has no weights (expected one of {', '.join(HF_WEIGHT_FILES)})")
    if need_processor:
        if not any((root / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
            raise ValueError(
                f"model directory {root} has no image processor "
                f"(expected {' or '.join(_IMAGE_PROCESSOR_FILES)}; save the processor with save_pretrained)"
            )
        if not any((root / name).is_file() for name in _TOKENIZER_FILES):
            raise ValueError(f"model directory {root} has no tokenizer (expected {' or '.join(_TOKENIZER_FILES)})")
    return root


def check_clip_dir(path: str | Path) -> Path:
    """``path`` if it is an open_clip model directory with weights, else ValueError naming it."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"CLIP model directory {root} does not exist: no such directory{near_miss(root)}")
    if not (root / CLIP_CONFIG).is_file():
        raise ValueError(f"{root}: not an open_clip model directory (no {CLIP_CONFIG})")
    if not any(p.suffix in CLIP_WEIGHT_SUFFIXES for p in root.iterdir() if p.is_file()):
        raise ValueError(f"CLIP model directory {root} has no weights file ({', '.join(CLIP_WEIGHT_SUFFIXES)})")
    return root


def clip_spec(model_dir: str | Path) -> str:
    """The open_clip model name (``local-dir:DIR``) of a checked CLIP directory."""
    return "local-dir:" + str(check_clip_dir(model_dir))


# --- roles ---------------------------------------------------------------------------------

def parse_clip(spec: str | Path) -> ModelSpec:
    """A CLIP (ranker) spec: a local directory (checked), ``hf-hub:ORG/REPO`` or
    ``NAME:PRETRAINED``; ValueError otherwise."""
    parsed = ModelSpec.parse(spec)
    if parsed.local:
        check_clip_dir(parsed.path)
        return parsed
    if parsed.kind == OPEN_CLIP_HUB or parsed.kind == OPEN_CLIP and parsed.weights:
        return parsed
    if parsed.shadow:
        raise ValueError(parsed.both_readings("a CLIP spec is a model directory, 'hf-hub:org/repo' or "
                                              "'NAME:PRETRAINED'"))
    raise ValueError(f"CLIP spec {str(spec)!r} is not a model directory, 'hf-hub:org/repo' or 'NAME:PRETRAINED' "
                     f"(e.g. 'ViT-L-14:openai')")


def open_clip_args(spec: str | Path) -> tuple[str, str | None]:
    """(model name, pretrained tag/file or None) for ``open_clip.create_model_and_transforms``."""
    parsed = parse_clip(spec)
    if parsed.local:
        return "local-dir:" + str(parsed.path), None
    if parsed.kind == OPEN_CLIP_HUB:
        return "hf-hub:" + parsed.name, None
    return parsed.name, parsed.weights


def parse_vision_init(spec: str) -> ModelSpec:
    """A ``--vision-init`` spec: ``timm:NAME[:FILE]``, ``open_clip:NAME:PRETRAINED`` or ``hf:DIR``."""
    parsed = ModelSpec.parse(spec)
    if parsed.scheme not in VISION_INIT_SCHEMES or not parsed.name:
        raise ValueError(f"--vision-init {spec!r}: expected timm:NAME[:FILE], "
                         "open_clip:NAME:PRETRAINED or hf:DIR")
    return parsed


# --- identity ------------------------------------------------------------------------------

def identity(spec: str | Path) -> dict:
    """The manifest record of a model: ``{"id": spec, "sha256", "kind"}``, kind "directory"
    (hash of its files), "file" (a weights file's hash), or "hub" (no hash: a hub id, a
    pretrained tag, or a path that is not there)."""
    parsed = ModelSpec.parse(spec)
    path = parsed.path
    if path is None and parsed.kind in (OPEN_CLIP, TIMM) and parsed.weights:
        path = Path(parsed.weights).expanduser()  # NAME:FILE
    if path is not None and path.is_dir():
        record = {"id": parsed.text, "sha256": dir_sha256(path), "kind": "directory"}
        return {**record, "untrained": True} if untrained(path) else record
    if path is not None and path.is_file():
        return {"id": parsed.text, "sha256": file_sha256(path), "kind": "file"}
    return {"id": parsed.text, "sha256": None, "kind": "hub"}


def untrained(path: str | Path) -> bool:
    """Whether model directory ``path`` is marked as never trained (its ``capfilt_model.json``
    says ``"trained": false``: random weights from ``capfilt models init``)."""
    try:
        record = json.loads((Path(path) / MODEL_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(record, dict) and record.get("trained") is False
