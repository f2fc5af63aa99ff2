"""Trace reading (malformed lines are clear errors) and the synthetic generator's chained ids."""

from __future__ import annotations

import pytest

from kv_policy import SyntheticTraceConfig, TraceRequest, parse_request, read_trace, synthetic_trace, write_trace


def test_reads_mooncake_lines_and_block_tokens(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"timestamp": 40, "input_length": 1100, "output_length": 3, "hash_ids": [1, 2, 3]}\n\n'
        '{"timestamp": 41, "input_length": 1024, "output_length": 3, "hash_ids": [1, 2]}\n'
    )
    reqs = read_trace(path)
    assert reqs[0] == TraceRequest(40.0, 1100, 3, (1, 2, 3))
    assert reqs[0].block_tokens(512) == [512, 512, 76]
    assert reqs[1].block_tokens(512) == [512, 512]
    assert len(read_trace(path, limit=1)) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 1}', "missing field"),
        ('{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": []}', "timestamp"),
        ('{"timestamp": 1, "input_length": "5", "output_length": 1, "hash_ids": []}', "input_length"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": [1, "a"]}', "hash_ids"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": 7}', "hash_ids"),
    ],
)
def test_malformed_lines_are_rejected_with_a_clear_error(line, message):
    with pytest.raises(ValueError, match=message):
        parse_request(line)


def test_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 1, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_trace(path)


def test_synthetic_ids_are_chained_and_round_trip(tmp_path):
    cfg = SyntheticTraceConfig(requests=400, session_fraction=0.5, drift=2.0, seed=7)
    reqs = list(synthetic_trace(cfg))
    assert reqs == list(synthetic_trace(cfg))  # deterministic for a seed
    parent: dict[int, int | None] = {}
    for r in reqs:
        prev = None
        for h in r.hash_ids:
            assert parent.setdefault(h, prev) == prev  # an id always follows the same prefix
            prev = h
        assert (len(r.hash_ids) - 1) * cfg.block_tokens < r.input_length <= len(r.hash_ids) * cfg.block_tokens
    shared = sum(1 for r in reqs if r.hash_ids[0] in {q.hash_ids[0] for q in reqs[:10]})
    assert shared > 10
    path = tmp_path / "syn.jsonl"
    write_trace(reqs, path)
    assert read_trace(path) == reqs
    with pytest.raises(ValueError):
        SyntheticTraceConfig(session_fraction=1.5)
