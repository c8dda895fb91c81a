"""The layout contract (docs/architecture.md): one installed import name, imports that point one
way (jobs -> pipeline -> model -> transforms), Beam only under pipeline/, short modules, and
sub-packages instead of file-name prefixes."""
import ast
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("transforms", "model", "pipeline", "jobs")  # lowest first
MAX_LINES = 400


def _modules():
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            yield layer, path


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_wheel_installs_one_top_level_name(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside setup.py
    for layer in LAYERS:
        shutil.copytree(REPO / layer, src / layer, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("capfilt-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"capfilt", next(t for t in tops if t.endswith(".dist-info"))}
    names = zipfile.ZipFile(wheel).namelist()
    for layer in LAYERS:
        assert f"capfilt/{layer}/__init__.py" in names
    assert any(n.startswith("capfilt/model/configs/") and n.endswith(".json") for n in names)
    assert any(n.startswith("capfilt/jobs/configs/") and n.endswith(".yaml") for n in names)


def test_imports_point_one_way_and_only_pipeline_imports_beam():
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for layer, path in _modules():
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] in LAYERS:
                bad.append(f"{path.relative_to(REPO)}: bare import {name}")
            if parts[0] == "capfilt" and len(parts) > 1 and rank[parts[1]] > rank[layer]:
                bad.append(f"{path.relative_to(REPO)}: upward import {name}")
            if parts[0] == "apache_beam" and layer != "pipeline":
                bad.append(f"{path.relative_to(REPO)}: imports Beam")
            if layer == "transforms" and parts[0] in ("torch", "transformers", "open_clip", "timm"):
                bad.append(f"{path.relative_to(REPO)}: transforms imports model code ({name})")
    assert bad == []


def test_modules_are_short():
    long = {str(path.relative_to(REPO)): n for _, path in _modules()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_no_folder_holds_files_sharing_a_prefix():
    prefixes = defaultdict(list)
    for _, path in _modules():
        stem = path.stem
        if "_" in stem and not stem.startswith("_"):
            prefixes[(path.parent, stem.split("_")[0])].append(stem)
    shared = {f"{folder.relative_to(REPO)}/{prefix}_*": stems for (folder, prefix), stems in prefixes.items()
              if len(stems) > 1}
    assert shared == {}


@pytest.mark.parametrize("question, path, function", [
    ("where is the keep decision made", "pipeline/curate/select.py", "select_captions"),
    ("where is the ITM loss", "model/training/losses.py", "itm_loss"),
    ("where is a bad image refused", "transforms/image.py", "decode_image"),
])
def test_questions_are_answered_by_folder_and_file_names(question, path, function):
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, question
