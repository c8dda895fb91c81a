"""What each worker decides for itself: its torch threads (its share of its own machine's cores,
from the runner's process count), and the device/precision its stages record per shard."""
import os

import pytest
import torch

from capfilt.pipeline.curate.inference import RankHandler, thread_share
from capfilt.pipeline.curate.options import PER_CORE, CurateConfig, make_pipeline_options, processes_per_machine

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("args, expected", [
    (["--runner", "FnApiRunner"], 1),
    (["--runner", "FnApiRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"], 2),
    (["--runner", "FnApiRunner", "--direct_num_workers", "0"], os.cpu_count()),
    (["--runner", "PortableRunner", "--job_endpoint", "localhost:1", "--sdk_worker_parallelism", "3"], 3),
    (["--runner", "PortableRunner", "--job_endpoint", "localhost:1"], 1),
    (["--runner", "DataflowRunner"], PER_CORE),
    (["--runner", "DataflowRunner", "--experiments", "no_use_multiple_sdk_containers"], None),
])
def test_processes_per_machine_from_the_runners_options(args, expected):
    assert processes_per_machine(make_pipeline_options(args)) == expected


def test_thread_share_is_the_workers_own_cores_divided():
    assert thread_share(None) is None  # unknown: torch's default
    assert thread_share(PER_CORE) == 1
    assert thread_share(1) == CORES
    assert thread_share(2) == max(1, CORES // 2)
    assert thread_share(10 * CORES) == 1


def test_a_handler_sets_its_share_of_threads_when_it_loads(tiny_models, monkeypatch):
    cfg = CurateConfig(inputs=("x",), out="o", no_synthetic=True, no_filter=True, clip=str(tiny_models["clip"]),
                       precision="fp32").replace(worker_processes=2)
    before = torch.get_num_threads()
    try:
        handler = RankHandler(cfg.clip, cfg)
        handler.load_model()
        assert torch.get_num_threads() == max(1, CORES // 2)
        assert handler.ran_on() == "cpu/fp32"
        explicit = RankHandler(cfg.clip, cfg.replace(torch_threads=1))
        explicit.load_model()
        assert torch.get_num_threads() == 1  # --torch-threads wins
    finally:
        torch.set_num_threads(before)
