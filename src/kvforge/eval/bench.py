"""``kvforge bench``: every metric for several caches on the same windows, in one run, into one folder.

The results folder is named after the settings (model, windows, lengths, and a short hash of the full
settings including the cache list) and is never overwritten: a second run with the same settings gets
a ``-2`` suffix (:mod:`kvforge.results`, shared with the scripts in ``benchmarks/``). It holds
``results.json`` (the run's metadata, settings and rows), ``results.md`` and PNG plots.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..results import Results, settings_digest
from ..specs import CacheUnavailableError, parse_spec
from .agreement import agreement, default_prompts
from .common import token_windows
from .needle import needle
from .perplexity import perplexity

METRICS = ("ppl", "agree", "needle")


@dataclass
class BenchSettings:
    model: str
    caches: list[str]
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    text: str = "pydoc"
    split: str = "eval"
    windows: int = 4
    context: int = 512
    score: int = 512
    chunk: int = 32
    agree_prompts: int = 4
    agree_prompt_tokens: int = 256
    agree_tokens: int = 32
    needle_lengths: list[int] = field(default_factory=lambda: [512, 1024])
    needle_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    needle_trials: int = 1
    single_pass: bool = False  # also report the single-pass perplexity per cache
    # bytes held per token after a prefill of this many tokens of the first text (0: not measured); the size
    # the presets' targets are stated at (a quantized cache's residual window weighs less as contexts grow)
    size_tokens: int = 2048
    # converted models of the same base (kvforge.mla directories) run with every cache too, on the same
    # windows, so that MLA, quantization and both share one table and one quality-versus-bytes plot
    variants: list[str] = field(default_factory=list)

    def validate(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        if not self.caches:
            raise ValueError("no caches to benchmark")
        from ..texts import text_names

        text_names(self.text)  # an unknown text fails before any model work
        if self.size_tokens < 0:
            raise ValueError(f"size_tokens must be >= 0 (0 skips the size measurement), got {self.size_tokens}")
        for c in self.caches:
            parse_spec(c)  # unknown specs fail before any model work
        for v in self.variants:
            if not (Path(v) / "kvforge_mla.json").is_file():
                raise ValueError(f"{v}: not a converted model directory (no kvforge_mla.json); --variants takes "
                                 "the output of `kvforge mla convert`/`finetune`")

    def folder_name(self) -> str:
        digest = settings_digest(asdict(self))
        model = Path(self.model).name if "/" in self.model else self.model
        return f"{model}_w{self.windows}x{self.context}+{self.score}_k{self.chunk}_{len(self.caches)}caches_{digest}"


def _variant(path: str, base):
    """A converted model directory, checked to come from ``base`` (same windows, same baseline)."""
    from ..models import converted_loader, fingerprint

    loader = converted_loader(path)
    if loader is None:
        raise ValueError(f"{path}: not a model converted by kvforge (no conversion file in it)")
    model = loader(path, next(base.parameters()).dtype)
    mla = model.kvforge_mla
    if mla.base_fingerprint != fingerprint(base):
        raise ValueError(f"{path}: converted from another model (base fingerprint {mla.base_fingerprint[:12]}, "
                         f"this model's {fingerprint(base)[:12]})")
    return model


@torch.inference_mode()
def _size_at(model, spec, ids) -> dict:
    """Bytes per token a fresh cache of ``spec`` holds after a prefill of ``ids``, and a float16 cache's."""
    from ..models import kv_bytes_fp16
    from ..run import model_device, prefill
    from ..specs import cache_nbytes

    cache = spec.build(model)
    prefill(model, ids.to(model_device(model)), cache)
    n = ids.shape[1]
    return {"tokens": n, "bytes_per_token": cache_nbytes(cache) / n, "fp16_bytes_per_token": kv_bytes_fp16(model, n) / n}


def run_bench(settings: BenchSettings, out_root: str | Path = "results", model=None, tokenizer=None) -> Path:
    """Run the matrix (every cache on every text) and write the results folder; returns its path."""
    from ..models import load_model
    from ..texts import load_text, text_names
    from .report import write_report

    settings.validate()
    # the metadata is taken now (start time, command line); the folder is made when the results are written
    record = Results(out_root, settings.folder_name(), asdict(settings))
    if model is None:
        model, tokenizer = load_model(settings.model)
    names = text_names(settings.text)
    texts = {name: load_text(name, settings.split) for name in names}
    # the same windows, prompts and needles for every cache (all cut before the first cache runs, so a text
    # that is too short fails before any work)
    windows = {n: token_windows(tokenizer, t, settings.windows, settings.context + settings.score, name=n)
               for n, t in texts.items()}
    size_ids = None
    if settings.size_tokens:
        size_ids = token_windows(tokenizer, "\n\n".join(texts.values()), 1, settings.size_tokens)[0]
    caches = list(dict.fromkeys(["dynamic", *settings.caches]))  # the baseline always runs, first
    models = [("", model)] + [(Path(v).name, _variant(v, model)) for v in settings.variants]
    rows: list[dict] = []
    for i, (name, text) in enumerate(texts.items()):  # sizes do not depend on the text: measured once
        rows += _text_rows(settings, models, caches, tokenizer, name, text, windows[name], size_ids if i == 0 else None)
    return write_report(record, rows)


def _text_rows(settings, models, caches, tokenizer, name, text, windows, size_ids) -> list[dict]:
    prompts = default_prompts(tokenizer, settings.agree_prompts, settings.agree_prompt_tokens, text)
    rows: list[dict] = []
    baseline = None
    for (label, model), spec_text in ((m, c) for m in models for c in caches):
        spec = parse_spec(spec_text)
        ok, why = spec.available()
        if not ok:
            rows.append({"cache": str(spec), "text": name, "skipped": why})
            continue
        row: dict = {"cache": f"{label} + {spec}" if label else str(spec), "text": name}
        t0 = time.perf_counter()
        try:
            if size_ids is not None:
                row["size"] = _size_at(model, spec, size_ids)
            if "ppl" in settings.metrics:
                res = perplexity(model, tokenizer, spec, windows=windows, context=settings.context,
                                 score=settings.score, chunk=settings.chunk, baseline=baseline)
                if baseline is None:  # the baseline's change against itself is 0
                    res.baseline_ppl = res.ppl
                    baseline = res
                row["ppl"] = res.to_dict()
                if settings.single_pass:
                    row["ppl_single_pass"] = perplexity(
                        model, tokenizer, spec, windows=windows, context=settings.context, score=settings.score,
                        single_pass=True).to_dict()
            if "agree" in settings.metrics:
                row["agree"] = agreement(model, tokenizer, spec, prompts=prompts, new_tokens=settings.agree_tokens).to_dict()
            if "needle" in settings.metrics:
                row["needle"] = needle(model, tokenizer, spec, lengths=tuple(settings.needle_lengths),
                                       depths=tuple(settings.needle_depths), trials=settings.needle_trials,
                                       text=text).to_dict()
        except (CacheUnavailableError, ImportError) as e:
            row = {"cache": str(spec), "text": name, "skipped": str(e)}
        except Exception as e:  # noqa: BLE001 - one failing cache must not lose the others' results
            row["error"] = f"{type(e).__name__}: {e}"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
    return rows

