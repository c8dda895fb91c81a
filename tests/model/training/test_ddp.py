"""DDP: a 2-process gloo run matches a 1-process run at the same global batch.

Both runs go through `capfilt pretrain` (BLIP with ITC + ITM + LM, momentum encoder and queue).
The 2 processes are spawned with torch.multiprocessing on 127.0.0.1 and take the environment
`torchrun` would give them. ITC columns, ITM negatives and the queue are gathered across ranks
and the LM loss is normalised by the global token count, so only float summation order differs.
"""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from capfilt.jobs.cli import main

MICRO = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8},
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
    "image_text_hidden_size": 32, "projection_dim": 32,
}
STEPS = 3


def _args(out, data, tokenizer, cfg_file, batch_size):
    return ["pretrain", "--arch", "blip", "--data", str(data), "--out", str(out), "--tokenizer", str(tokenizer),
            "--model-config", str(cfg_file), "--batch-size", str(batch_size), "--steps", str(STEPS), "--lr", "1e-3",
            "--momentum", "--queue-size", "16", "--log-every", "1", "--no-progress", "--shuffle-buffer", "8"]


def _worker(rank, world, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    try:
        if main(argv) != 0:
            raise RuntimeError(f"rank {rank}: pretrain failed")
        if dist.get_backend() != "gloo":
            raise RuntimeError(f"expected gloo, got {dist.get_backend()}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_one_process(tmp_path, synth_world, tiny_tokenizer, monkeypatch):
    cfg_file = tmp_path / "micro.json"
    cfg_file.write_text(json.dumps(MICRO))
    data = synth_world / "web"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(tmp_path / "one", data, tiny_tokenizer, cfg_file, 8)) == 0
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), _args(tmp_path / "two", data, tiny_tokenizer, cfg_file, 4)),
             nprocs=2, join=True)

    ckpt = f"checkpoints/pretrain/step-{STEPS:08d}/model.safetensors"
    one, two = load_file(str(tmp_path / "one" / ckpt)), load_file(str(tmp_path / "two" / ckpt))
    assert one.keys() == two.keys()
    moved = 0
    init = load_file(str(tmp_path / "one" / "init" / "itm" / "model.safetensors"))
    for key in one:
        assert torch.allclose(one[key], two[key], atol=2e-5, rtol=1e-4), key
        short = key.removeprefix("itm.")
        if short in init and not torch.equal(init[short], one[key]):
            moved += 1
    assert moved > 10  # the comparison is between trained weights, not two copies of the init
    logs = [[json.loads(x) for x in (tmp_path / d / "pretrain_log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    for a, b in zip(*logs):
        for name in ("itc", "itm", "lm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5), (a["step"], name)
    summary = json.loads((tmp_path / "two" / "pretrain_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
