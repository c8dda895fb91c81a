"""The job file of `capfilt run-job` (jobs/job_file.py): how sections become step options, and
which specs count as model paths. The exit codes of bad files are tested in test_run_job.py."""
import json

import pytest

from capfilt.jobs.scheduled.job_file import JobError, load_job


def write_job(tmp_path, **sections):
    job = {"output_root": "out", "inputs": {"url_lists": "urls/*.csv"},
           "models": {"captioner": "Salesforce/blip-image-captioning-large",
                      "filter": "Salesforce/blip-itm-large-coco", "clip": "ViT-L-14:openai"}}
    job.update(sections)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))  # JSON is YAML
    return path


def test_ingest_options_keep_false_none_and_lists_and_set_the_raw_extension(tmp_path):
    path = write_job(tmp_path, ingest={"options": {
        "image_size": 64, "skip_reencode": False, "user_agent_token": None, "verify_hash": ["sha256", "md5"],
        "output_format": "webdataset", "caption_col": "text"}})
    job = load_job(path)
    # img2dataset booleans may default to true: false is passed, not dropped
    assert job.ingest_argv == ["--caption-col", "text", "--image-size", "64", "--output-format", "webdataset",
                               "--skip-reencode", "false", "--user-agent-token", "none", "--verify-hash", "sha256,md5"]
    assert job.raw_ext == ".tar"
    assert load_job(write_job(tmp_path)).raw_ext == ".parquet"


def test_model_specs_paths_hub_ids_and_open_clip(tmp_path):
    (tmp_path / "models" / "itm").mkdir(parents=True)
    path = write_job(tmp_path, models={"captioner": "org/not-here", "filter": "models/itm",
                                       "clip": "local-dir:models/itm"})
    job = load_job(path)
    assert job.models == {"captioner": "org/not-here",  # a hub id: no 'org' directory beside the job file
                          "filter": str(tmp_path / "models" / "itm"),
                          "clip": "local-dir:" + str(tmp_path / "models" / "itm")}
    for spec in ("local-dir:models/clip", "models/captioner", "a/b/c", "~/no-such-capfilt-model", "..\\m"):
        with pytest.raises(JobError, match="does not exist") as err:
            load_job(write_job(tmp_path, models={"captioner": spec, "filter": "models/itm", "clip": "ViT-B-32:openai"}))
        assert err.value.code == 2


def test_release_true_means_the_defaults_and_sections_must_be_mappings(tmp_path):
    assert load_job(write_job(tmp_path, release=True)).release_argv == ["--clip", "ViT-L-14:openai"]
    assert load_job(write_job(tmp_path, release=False)).release_argv is None
    for section, value in (("curate", [1]), ("ingest", "image_size=64"), ("models", "ViT"), ("release", 3)):
        with pytest.raises(JobError, match=f"{section}: expected a mapping") as err:
            load_job(write_job(tmp_path, **{section: value}))
        assert err.value.code == 2
