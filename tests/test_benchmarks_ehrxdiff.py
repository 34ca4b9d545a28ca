"""benchmarks/bench_ehrxdiff.py on tiny sizes: each mode's functions run, their tables render, the paper-size
parameter counts hold and ``--json`` writes the figures."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("bench_ehrxdiff")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(autouse=True)
def keep_threads():
    """``main`` and ``predict_once`` set torch's thread count: give it back to the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_steps_of_every_configuration(bench):
    results = bench.bench_train(batch_size=2, steps=1, warmup=1, mean_events=3.0)
    assert [(item["conditioning"], item["adapter_type"]) for item in results] == list(bench.TRAIN_CONFIGS)
    for item in results:
        assert item["seconds_per_step"] > 0 and item["triplets_per_s"] == pytest.approx(2 / item["seconds_per_step"])
        assert set(item["median_seconds"]) == {"step", "conditioning", "unet_forward", "backward", "optimizer"}
        assert item["trained_parameters"] > 0
    # each ratio's baseline is 1 against itself
    assert results[0]["vs_cross_attention_conditioning"] == 1.0 == results[0]["vs_cross_attention_adapter"]
    assert results[3]["vs_cross_attention_conditioning"] == pytest.approx(
        results[3]["seconds_per_step"] / results[2]["seconds_per_step"])
    table = bench.train_table(results, "tiny")
    assert "hybrid cond., token_linear adapter" in table and "triplets/s" in table


def test_sample_mode_writes_its_table_and_json(bench, tmp_path, capsys):
    out = tmp_path / "sample.json"
    report = bench.main(["--mode", "sample", "--batch-size", "1", "--inference-steps", "1", "2", "--repeats", "1",
                         "--warmup", "0", "--events", "3", "--threads", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| 2 DDIM steps |" in printed and "guidance 2 vs 1: time" in printed and "load average" in printed
    written = json.loads(out.read_text())
    assert written["mode"] == "sample" and len(written["results"]) == 4 == len(report["results"])
    by_key = {(item["inference_steps"], item["guidance_scale"]): item for item in written["results"]}
    assert by_key[(1, 1.0)]["time_vs_fewest_steps"] == 1.0
    assert by_key[(2, 2.0)]["time_vs_unguided"] == pytest.approx(
        by_key[(2, 2.0)]["seconds_per_call"] / by_key[(2, 1.0)]["seconds_per_call"])


def test_paper_parameter_counts(bench):
    counts = bench.paper_parameter_counts()
    bench.check_paper_counts(counts)
    assert set(counts) == {"unet", "vae", "image_encoder", "event_encoder", "fusion_adapter"}
    assert counts["unet"] == pytest.approx(505.8e6, rel=0.01) and counts["vae"] == pytest.approx(55.3e6, rel=0.01)
    with pytest.raises(AssertionError, match="unet"):
        bench.check_paper_counts({**counts, "unet": 400_000_000})
    assert "| total |" in bench.parameter_table(counts)


def test_predict_once_builds_in_the_dtype_and_renders(bench):
    result = bench.predict_once("demo", "bfloat16", repeats=1, mean_events=3, threads=1)
    assert torch.get_default_dtype() == torch.float32  # restored after the build
    assert result["finite"] and result["output_shape"] == [1, 1, 64, 64]
    assert len(result["call_seconds"]) == 1 == len(result["unet_forward_seconds"])
    assert result["peak_rss_mb"] >= result["rss_after_build_mb"] >= result["rss_after_imports_mb"] > 0
    result["estimate_gb"] = 1.0
    skipped = {"dtype": "float16", "size": "demo", "estimate_gb": 1.0, "error": "skipped: test"}
    result["load_average"] = skipped["load_average"] = [1.0, 1.0, 1.0]
    table = bench.memory_table([result, skipped], "tiny")
    assert "| tiny | bfloat16 | float16 |" in table and "skipped: test" in table


def test_render_joins_memory_reports(bench, tmp_path, capsys):
    run = {"dtype": "float32", "size": "demo", "estimate_gb": 1.0, "load_average": [1.0, 1.0, 1.0],
           "rss_after_imports_mb": 500.0, "rss_after_build_mb": 520.0, "peak_rss_mb": 600.0, "build_s": 0.1,
           "call_seconds": [0.3, 0.2], "unet_forward_seconds": [0.1, 0.05], "finite": True}
    paths = []
    for dtype, peak in (("float32", 600.0), ("bfloat16", 450.0)):
        path = tmp_path / f"{dtype}.json"
        path.write_text(json.dumps({"mode": "memory", "date": "today", "threads": 1, "parameters": {"total": 5},
                                    "load_average_start": [1, 1, 1], "load_average_end": [1, 1, 1], "wall_s": 1.0,
                                    "runs": [{**run, "dtype": dtype, "peak_rss_mb": peak}]}))
        paths.append(str(path))
    bench.main(["--render", *paths])
    printed = capsys.readouterr().out
    assert "| today, demo pipeline, one 64 px image, 1 threads | float32 | bfloat16 |" in printed
    assert "| peak RSS vs float32 | 1.00x | 0.75x |" in printed
