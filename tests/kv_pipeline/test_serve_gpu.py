"""`kvtier serve --engine lmdeploy` end to end: kvtier's server over LMDeploy's engine, restarted over one disk tier.

CUDA, LMDeploy 0.18 and the server's packages only; the real ``openai`` client. The first server saves a pinned
shared context and answers requests against it (their ``cached_tokens`` cover the context); a second server
process over the same cache directory still knows the context, warms up (``--warm-up``: the context's blocks
come up from disk into DDR before it serves, its log says so), reports them in ``cached_tokens`` and answers with
the same greedy completion. Both expose ``/metrics``.
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
    def __init__(self, model: Path, cache: Path, log: Path, *extra: str) -> None:
        self.port = _free_port()
        self.log = log
        cmd = [sys.executable, "-m", "kv_pipeline.cli", "--log-level", "INFO", "serve", str(model)]
        cmd += ["--engine", "lmdeploy"]
        cmd += ["--ddr-bytes", "1GiB", "--disk-bytes", "1GiB", "--cache-dir", str(cache), "--session-len", "8192"]
        # every saved block goes to disk at once (the default, selective, waits for a block's second use)
        cmd += ["--write-mode", "write-through", *extra]
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

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0)

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            return r.read().decode()

    def ask(self, question: str, context: str | None = None) -> tuple[str, int]:
        """A streamed completion; its text and the ``cached_tokens`` of its final usage chunk."""
        extra = {"shared_context_id": context} if context else None
        stream = self.client().completions.create(
            model="m", prompt=question, max_tokens=8, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        )  # fmt: skip
        text, cached = "", None
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        assert cached is not None, "no usage chunk"
        return text, cached

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.file.close()


def test_serve_shared_context_survives_restart(tmp_path):
    from kv_benchmarks.models import build_model_dir

    model = build_model_dir(tmp_path / "model", "qwen2-tiny", dtype="bfloat16", device="cuda", peaked=True)
    cache = tmp_path / "cache"
    document = " ".join(f"item{i} costs {i * 7 % 101} coins;" for i in range(400))
    question = " How much does item17 cost?"

    first = _Server(model, cache, tmp_path / "first.log")
    try:
        saved = first.post("/v1/shared_contexts", {"id": "price-list", "prompt": document, "pin": True})
        full = saved["tokens"] // 64 * 64
        assert saved["id"] == "price-list" and full >= 64
        text, cached = first.ask(question, "price-list")
        assert cached >= full  # the context came from LMDeploy's GPU cache or kvtier, never recomputed
        listed = json.loads(first.get("/v1/shared_contexts"))["data"]
        assert [c["id"] for c in listed] == ["price-list"]
        metrics = first.get("/metrics")
        assert "kvtier_ttft_seconds" in metrics and "kvtier_tier_blocks" in metrics
    finally:
        first.stop()

    # the restarted server warms up: the pinned context's blocks come up from disk before it accepts requests
    second = _Server(model, cache, tmp_path / "second.log", "--warm-up")
    try:
        info = json.loads(second.get("/v1/shared_contexts/price-list"))
        assert info["tokens"] == saved["tokens"]
        assert (
            info["blocks_by_tier"].get("disk", 0) >= full // 64 and info["blocks_by_tier"].get("ddr", 0) >= full // 64
        )
        again, cached_again = second.ask(question, "price-list")
    finally:
        second.stop()
    log = second.log.read_text(errors="replace")
    warm = re.findall(r"kvtier: warm-up promoted (\d+) of (\d+) blocks", log)
    assert warm and int(warm[0][0]) >= full // 64, f"no warm-up:\n{log[-4000:]}"
    hits = [(int(a), int(b)) for a, b in re.findall(r"kvtier: request \d+ loads (\d+) blocks \((\d+) from disk\)", log)]
    assert hits, f"the restarted server found nothing in kvtier:\n{log[-4000:]}"
    assert all(n > 0 and disk == 0 for n, disk in hits)  # warmed up: every block it loads is in DDR already
    assert cached_again >= full
    assert again == text
