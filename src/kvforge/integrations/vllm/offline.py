"""Run prompts through one vLLM engine with the kvforge connector, in this process, and report JSON.

``python -m kvforge.integrations.vllm.offline JOB.json OUT.json`` (in the vLLM environment). The job:
``model`` (directory), ``extra`` (the connector's ``kv_connector_extra_config``; ``null``: no connector),
``prompts`` (lists of token ids), ``max_tokens`` (one for all, or one per prompt; default 16), optional ``salts`` (one ``cache_salt`` per prompt),
``dtype`` (default float32), ``max_model_len`` (4096), ``kv_space_gib`` (``VLLM_CPU_KVCACHE_SPACE``, 2),
``prefix_caching`` (vLLM's own, default false so that every hit comes from the store), ``threads``
(``OMP_NUM_THREADS``; vLLM's CPU build otherwise leaves one core to the front end). Prompts run one at a
time; the output has each one's generated ids, its wall-clock seconds (with ``max_tokens`` 1, the time to
the first token) and vLLM's count of cached prompt tokens, plus the start-up time and the connector's
counters (the engine runs in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
The tests and ``benchmarks/vllm_connector.py`` start one such process per vLLM instance.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run(job: dict) -> dict:
    if "kv_space_gib" in job or "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(job.get("kv_space_gib", 2))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if job.get("threads"):
        os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    extra = job.get("extra")
    transfer = None
    if extra is not None:
        transfer = KVTransferConfig(kv_connector="KVForgeConnector", kv_connector_module_path="kvforge.integrations.vllm",
                                    kv_role="kv_both", kv_connector_extra_config=extra)
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), max_model_len=job.get("max_model_len", 4096),
              enable_prefix_caching=job.get("prefix_caching", False), kv_transfer_config=transfer,
              enforce_eager=True, seed=0)
    started = time.perf_counter() - t0
    salts = job.get("salts") or [None] * len(job["prompts"])
    budgets = job.get("max_tokens", 16)
    budgets = budgets if isinstance(budgets, list) else [budgets] * len(job["prompts"])
    results = []
    for ids, salt, budget in zip(job["prompts"], salts, budgets):
        prompt = TokensPrompt(prompt_token_ids=list(ids))
        if salt is not None:
            prompt["cache_salt"] = salt
        t = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(max_tokens=budget, temperature=0.0,
                                                    ignore_eos=True), use_tqdm=False)[0]
        took = time.perf_counter() - t
        results.append({"tokens": list(out.outputs[0].token_ids), "seconds": took,
                        "cached_tokens": out.num_cached_tokens})
    stats = {}
    if extra is not None:
        stats = _connector_stats(llm)
    return {"started_s": started, "results": results, "connector": stats}


def _connector_stats(llm) -> dict:
    """The counters of the scheduler's and the worker's connector (both in this process), added up."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    out: dict[str, int] = {}
    sides = [getattr(getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None), "scheduler", None)]
    sides = [getattr(s, "connector", None) for s in sides]
    if has_kv_transfer_group():
        sides.append(get_kv_transfer_group())
    stores = {}
    for side in sides:
        for k, v in getattr(side, "stats", {}).items():
            out[k] = out.get(k, 0) + v
        if getattr(side, "store", None) is not None:
            stores[id(side.store)] = side.store
    # entries found but unusable (corrupted, another model or spec), counted by the store the sides share
    out["rejected"] = sum(s.stats.rejected for s in stores.values())
    return out


def launch(python: str, job: dict, timeout: float = 900, log: str | None = None) -> dict:
    """Run ``job`` in a new process with ``python`` (the vLLM environment's interpreter); its result.

    Raises ``RuntimeError`` with the end of the process's output when it fails or runs past ``timeout``
    seconds. ``log``: a file that keeps the whole output (vLLM's and the connector's log lines)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kvforge-vllm-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        try:
            proc = subprocess.run([python, "-m", "kvforge.integrations.vllm.offline", job_path, out_path],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"the vLLM process ran past {timeout:.0f} s") from e
        output = proc.stdout + proc.stderr
        if log:
            with open(log, "w") as f:
                f.write(output)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"the vLLM process failed (exit {proc.returncode}):\n{output[-4000:]}")
        with open(out_path) as f:
            result = json.load(f)
        result["log"] = output
        return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m kvforge.integrations.vllm.offline JOB.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    result = run(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
