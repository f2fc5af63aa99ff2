"""The LMDeploy engine refuses the same bad requests as the transformers engine, before LMDeploy runs."""

from __future__ import annotations

import pytest

from kv_pipeline import KVTierConfig
from kv_pipeline.lmdeploy_engine import LMDeployKVTierEngine
from kv_pipeline.requests import RequestError


@pytest.fixture
def engine(model_dir) -> LMDeployKVTierEngine:
    # Not started (that needs CUDA and LMDeploy): the checks need only the model's config and tokenizer.
    return LMDeployKVTierEngine(KVTierConfig(model=str(model_dir), engine="lmdeploy"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": None}, "prompt must be text"),
        ({"prompt": b"abc"}, "prompt is bytes"),
        ({"prompt": [1, 2.5]}, r"prompt\[1\] is float"),
        ({"prompt": [1, 10**9]}, "outside the model's vocabulary"),
        ({"prompt": [1, 2], "max_new_tokens": 10**9}, "context length"),
        ({"prompt": [1, 2], "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": [1, 2], "session_id": 5}, "session_id"),
        ({"prompt": [1, 2], "temperature": -1.0}, "temperature"),
        ({"prompt": [1, 2], "temperature": 2.5}, "at most 2 on LMDeploy"),
        ({"prompt": [1, 2], "seed": "x"}, "seed"),
    ],
)
async def test_bad_requests_are_refused_with_request_errors(engine, kwargs, message):
    with pytest.raises(RequestError, match=message):
        async for _ in engine.generate(**kwargs):
            pass


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
async def test_prompt_logits_refuses_a_bad_k(engine, k):
    with pytest.raises(RequestError, match="k must be an integer >= 1"):
        await engine.prompt_logits([1, 2], k=k)


def test_text_and_chat_messages_encode_like_the_transformers_engine(engine, model_dir):
    from kv_runtime.backends.hf_backend import encode_with

    assert engine.validator.prompt("hello world") == encode_with(engine.tokenizer, "hello world")
    messages = [{"role": "user", "content": "hi"}]
    assert engine.validator.prompt(messages) == encode_with(engine.tokenizer, messages)
