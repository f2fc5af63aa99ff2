"""`kvtier serve` end to end: LMDeploy's OpenAI server with the connector, restarted over the same disk tier.

CUDA, LMDeploy 0.18 and its server's packages (fastapi, uvicorn) only. The first server computes a prompt and
writes its blocks down; a second server process, started over the same cache directory, must load them from
disk (its log says so) and answer with the same greedy completion.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("lmdeploy", "fastapi", "uvicorn", "openai")),
        reason="needs LMDeploy with its server packages",
    ),
]

STARTUP_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not logged within {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


def _get(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


class _Server:
    def __init__(self, model: Path, cache: Path, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        cmd = [sys.executable, "-m", "kv_pipeline.cli", "--log-level", "INFO", "serve", str(model)]
        cmd += ["--engine", "lmdeploy"]
        cmd += ["--ddr-bytes", "1GiB", "--disk-bytes", "1GiB", "--cache-dir", str(cache), "--session-len", "8192"]
        # every saved block goes to disk at once (the default, selective, waits for a block's second use)
        cmd += ["--write-mode", "write-through"]
        # a tiny model prefills in microseconds by its FLOPs: a low prior makes the cost model load its blocks
        cmd += ["--prefill-tflops", "0.001"]
        cmd += ["--cache-max-entry-count", "0.05", "--server-name", "127.0.0.1", "--server-port", str(self.port)]
        self.file = log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        deadline = time.monotonic() + STARTUP_S
        while not _get(f"http://127.0.0.1:{self.port}/v1/models"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(1)

    def complete(self, model: Path, prompt: str) -> str:
        body = {"model": str(model), "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["choices"][0]["text"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.file.close()


def test_serve_restart_loads_prefix_from_disk(tmp_path):
    from kv_benchmarks.models import build_model_dir

    model = build_model_dir(tmp_path / "model", "qwen2-tiny", dtype="bfloat16", device="cuda", peaked=True)
    cache = tmp_path / "cache"
    prompt = " ".join(f"item{i} costs {i * 7 % 101} coins;" for i in range(400))

    first = _Server(model, cache, tmp_path / "first.log")
    try:
        text = first.complete(model, prompt)
        _wait_for(first.log, "blocks written to disk", first.proc, 60)
    finally:
        first.stop()

    second = _Server(model, cache, tmp_path / "second.log")
    try:
        again = second.complete(model, prompt)
    finally:
        second.stop()
    log = second.log.read_text(errors="replace")
    hits = [(int(a), int(b)) for a, b in re.findall(r"kvtier: request \d+ loads (\d+) blocks \((\d+) from disk\)", log)]
    assert hits, f"the restarted server found nothing in kvtier:\n{log[-4000:]}"
    assert all(n > 0 and disk == n for n, disk in hits)  # a new process: every block it loads comes from disk
    assert again == text
