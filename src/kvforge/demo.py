"""``kvforge demo``: every capability on the bundled models, one line of result and its time per step.

Steps (``--steps`` picks, ``--quick`` keeps the first two):

``prefill``    prefill a passage into SmolLM2's cache and save it (one safetensors file)
``continue``   continue from the saved state in a fresh cache: the same tokens as re-reading the passage
``quant``      the same with kvforge's quantized cache (``safe``): bytes against fp16, greedy agreement
``mla``        SmolLM2 converted to latent attention at 2x (cached under ``~/.cache/kvforge/conversions``):
               bytes against fp16, perplexity change on a short held-out text
``translate``  the passage's SmolLM2 cache translated into Gemma 3: time against Gemma's own prefill,
               one answer with and without the translated context
``serve``      how to start the OpenAI-compatible server

Sizes are against a float16 cache of the same model (what people compare KV caches with); the float32
figure of the model as run here is given beside it. A PNG summary goes into the working folder
(``--workdir``, default ``~/.cache/kvforge/demo``, reused by every run).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .models import size_vs_fp16

STEPS = ("prefill", "continue", "quant", "mla", "translate", "serve")
QUICK = ("prefill", "continue")
QUESTION = "\n\nIn one sentence, the passage above is about"


@dataclass
class StepResult:
    step: str
    line: str  # one line of result, plain text (no console markup)
    seconds: float
    bytes_per_token: float | None = None  # KV bytes this step's cache holds per token, as run
    fp16_bytes_per_token: float | None = None  # the same model's float16 cache, for comparison
    quality: str = ""  # a few words for the summary plot
    data: dict = field(default_factory=dict)


def pick_steps(steps: str | None, quick: bool) -> list[str]:
    """The steps to run, in their fixed order; unknown names raise ``ValueError`` listing the known ones."""
    if quick and steps:
        raise ValueError("give either --quick or --steps, not both")
    if quick:
        return list(QUICK)
    if not steps:
        return list(STEPS)
    chosen = [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown demo step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    if {"continue", "quant"} & set(chosen) and "prefill" not in chosen:
        chosen.append("prefill")  # continuing and comparing need the saved passage
    return [s for s in STEPS if s in chosen]


class Demo:
    """The demo's state across steps: the source model and passage, its saved state, the continuation."""

    def __init__(self, model, tokenizer, name: str, workdir: Path, tokens: int = 1024, max_new_tokens: int = 24,
                 text: str | None = None, target=None, translator=None, calibration: list[str] | None = None,
                 conversion_dir: Path | None = None):
        from .texts import load_text

        self.model, self.tok, self.name, self.workdir = model, tokenizer, name, Path(workdir)
        self.max_new_tokens = max_new_tokens
        eval_text = text if text is not None else load_text("pydoc", "eval")
        cut = eval_text.rfind(" ", 0, tokens * 4) if len(eval_text) > tokens * 4 else len(eval_text)
        self.passage = eval_text[: cut if cut > 0 else tokens * 4]
        self.heldout = eval_text[len(self.passage):]
        self.ids = tokenizer(self.passage, return_tensors="pt").input_ids
        self.target, self.translator, self.calibration = target, translator, calibration
        self.conversion_dir = conversion_dir
        self.state = self.path = self.continuation = None

    def fp16(self, model=None) -> float:
        from .models import kv_bytes_fp16

        n = self.ids.shape[1]
        return kv_bytes_fp16(model or self.model, n) / n

    # ------------------------------------------------------------------ steps
    def step_prefill(self) -> StepResult:
        from .generate import prefill
        from .state import format_bytes

        t = time.perf_counter()
        self.state = prefill(self.model, self.tok, self.ids, chunk_size=512)
        self.path = self.state.save(self.workdir / "passage.kv")
        n, held, fp16 = self.state.num_tokens, self.state.nbytes / self.state.num_tokens, self.fp16()
        line = (f"{n} tokens prefilled and saved ({self.path.name}, {format_bytes(self.path.stat().st_size)}): "
                f"{fp16:,.0f} B/token as an fp16 cache ({held:,.0f} B/token as run, {self.model.dtype})")
        return StepResult("prefill", line, time.perf_counter() - t, held, fp16, "exact")

    def step_continue(self) -> StepResult:
        from .generate import generate
        from .state import KVState

        t = time.perf_counter()
        loaded = KVState.load(self.path, model=self.model)
        out = generate(self.model, self.tok, QUESTION, max_new_tokens=self.max_new_tokens, state=loaded)
        seconds = time.perf_counter() - t
        q_ids = self.tok(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids
        full = generate(self.model, self.tok, torch.cat([self.ids, q_ids], 1), max_new_tokens=self.max_new_tokens)
        self.continuation = out
        same = out.token_ids == full.token_ids[: len(out.token_ids)]
        line = (f"loaded and continued in a fresh cache: {'the same' if same else 'NOT the same'} {len(out.token_ids)} "
                f"greedy tokens as re-reading the passage; first token after {out.first_token_seconds:.2f}s vs "
                f"{full.first_token_seconds:.2f}s re-reading; it reads {out.forwarded_tokens} tokens, not "
                f"{full.forwarded_tokens}")
        held = self.state.nbytes / self.state.num_tokens
        return StepResult("continue", line, seconds, held, self.fp16(), "same tokens" if same else "differs",
                          {"text": out.text, "same": same})

    def step_quant(self) -> StepResult:
        from .generate import generate, prefill
        from .quant import QuantizedKVCache
        from .state import KVState, format_bytes

        t = time.perf_counter()
        qstate = prefill(self.model, self.tok, self.ids, cache=QuantizedKVCache.for_model(self.model, "safe"),
                         chunk_size=512)
        path = qstate.save(self.workdir / "passage-safe.kv")
        loaded = KVState.load(path, model=self.model)
        out = generate(self.model, self.tok, QUESTION, max_new_tokens=self.max_new_tokens, state=loaded,
                       cache=QuantizedKVCache.for_model(self.model, "safe"))
        seconds = time.perf_counter() - t
        ref = self.continuation.token_ids if self.continuation is not None else None
        if ref is None:
            ref = generate(self.model, self.tok, QUESTION, max_new_tokens=self.max_new_tokens,
                           state=KVState.load(self.path, model=self.model)).token_ids if self.path else []
        pairs = list(zip(out.token_ids, ref))
        agree = sum(a == b for a, b in pairs) / max(1, len(pairs))
        held, fp16 = qstate.nbytes / qstate.num_tokens, self.fp16()
        line = (f"quantized cache (kvforge-quant:preset=safe, K4/V4): {held:,.0f} B/token, {size_vs_fp16(held, fp16)} "
                f"(file {format_bytes(path.stat().st_size)}); greedy agreement with full precision "
                f"{100 * agree:.0f}% of {len(pairs)} tokens")
        return StepResult("quant", line, seconds, held, fp16, f"{100 * agree:.0f}% agreement", {"agreement": agree})

    def _converted(self):
        """SmolLM2 at 2x latent attention: loaded from the cached conversion when present, else converted and
        cached (``conversion_dir``)."""
        from .mla import convert, save_converted
        from .mla.convert import conversion_defaults
        from .models import converted_loader, fingerprint
        from .texts import calibration_pieces

        d = self.conversion_dir
        if d is not None and (loader := converted_loader(d)) is not None:
            model = loader(d, self.model.dtype)
            cfg = model.kvforge_mla  # reused only when made from this model with today's defaults
            if cfg.base_fingerprint == fingerprint(self.model) and all(
                    getattr(cfg, k) == v for k, v in conversion_defaults(2.0).items()):
                return model, True
        model = copy.deepcopy(self.model)
        texts = self.calibration or calibration_pieces(None, 6, 2000)  # two pieces of each text of the mix
        convert(model, self.tok, ratio=2, calibration=texts, name=self.name)
        if d is not None:
            save_converted(model, self.tok if hasattr(self.tok, "save_pretrained") else None, d)
        return model, False

    def step_mla(self) -> StepResult:
        from .eval import perplexity
        from .mla import kv_bytes_per_token
        from .run import token_windows

        t = time.perf_counter()
        model, cached = self._converted()
        windows = token_windows(self.tok, self.heldout, 1, min(384, len(self.tok(self.heldout).input_ids) - 1))
        ctx = windows[0].shape[1] * 2 // 3
        kw = dict(windows=windows, context=ctx, score=windows[0].shape[1] - ctx, show_progress=False)
        base = perplexity(self.model, self.tok, "dynamic", **kw)
        conv = perplexity(model, self.tok, "dynamic", **kw)
        held, fp16 = kv_bytes_per_token(model, 2), self.fp16()
        change = conv.ppl / base.ppl - 1
        line = (f"latent attention at 2x ({'cached conversion' if cached else 'converted now'}): {held:,.0f} B/token in "
                f"fp16, {size_vs_fp16(held, fp16)}; perplexity {base.ppl:.2f} -> {conv.ppl:.2f} ({100 * change:+.1f}%) on "
                f"{kw['score']} held-out tokens")
        return StepResult("mla", line, time.perf_counter() - t, held, fp16, f"PPL {100 * change:+.1f}%",
                          {"ppl_change": change})

    def step_translate(self) -> StepResult:
        from .generate import generate, prefill

        if self.target is None:
            raise ValueError("the translate step needs a target model")
        tgt, t_tok, t_name = self.target
        state = self.state if self.state is not None else prefill(self.model, self.tok, self.ids, chunk_size=512)
        t = time.perf_counter()
        translated = self.translator.translate(state, self.passage, self.model, tgt, self.tok, t_tok)
        t_tr = time.perf_counter() - t
        t = time.perf_counter()
        prefill(tgt, t_tok, self.passage, chunk_size=512)
        t_own = time.perf_counter() - t
        from .models import kv_bytes_fp16
        from .specs import cache_nbytes

        cache = translated.to_cache(tgt)  # what the target holds: its sliding layers keep their window
        n = translated.num_tokens
        held, fp16 = cache_nbytes(cache) / n, kv_bytes_fp16(tgt, n) / n
        with_ctx = generate(tgt, t_tok, QUESTION, max_new_tokens=self.max_new_tokens, state=translated)
        without = generate(tgt, t_tok, QUESTION.strip(), max_new_tokens=self.max_new_tokens)
        line = (f"{self.name}'s cache translated into {t_name} in {t_tr:.2f}s ({t_name}'s own prefill: {t_own:.2f}s, "
                f"{t_own / max(t_tr, 1e-9):.1f}x); answer with it: {with_ctx.text.strip()[:70]!r}; without: "
                f"{without.text.strip()[:70]!r}")
        return StepResult("translate", line, t_tr, held, fp16, f"{t_own / max(t_tr, 1e-9):.1f}x faster than prefill",
                          {"with": with_ctx.text, "without": without.text, "translate_s": t_tr, "prefill_s": t_own})

    def step_serve(self) -> StepResult:
        line = (f"serve it: kvforge serve --model {self.name} --cache kvforge-quant:preset=safe --port 8000, then point "
                "any OpenAI client at http://127.0.0.1:8000/v1 (needs: pip install 'kvforge[serve]')")
        return StepResult("serve", line, 0.0)


def run_steps(demo: Demo, steps: list[str], console=None) -> list[StepResult]:
    """Run ``steps`` in order, printing each one's line and time as it finishes (plain text: no markup)."""
    results = []
    for s in steps:
        r = getattr(demo, f"step_{s}")()
        results.append(r)
        if console is not None:
            console.print(f"{s:>9}  {r.seconds:6.1f}s  {r.line}", markup=False, highlight=False, soft_wrap=True)
    return results


def run_demo(model_name: str = "smollm2-135m", tokens: int = 1024, max_new_tokens: int = 24, workdir: Path | None = None,
             dtype: str = "float32", steps: str | None = None, quick: bool = False,
             target_name: str = "gemma3-270m") -> list[StepResult]:
    """Load the bundled models the chosen steps need and run them; returns each step's result."""
    from rich.console import Console

    from .models import cache_dir, load_model
    from .plots import plot_demo_summary

    chosen = pick_steps(steps, quick)
    console = Console()
    workdir = Path(workdir) if workdir else cache_dir() / "demo"  # one folder, reused: runs do not pile up
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load_model(model_name, dtype=dtype)
    target = translator = None
    if "translate" in chosen:
        from .translate import load

        tgt, t_tok = load_model(target_name, dtype=dtype)
        target, translator = (tgt, t_tok, target_name), load(model_name, target_name, model, tgt)
    console.print(f"kvforge demo on {model_name}: steps {', '.join(chosen)} (models loaded in "
                  f"{time.perf_counter() - t0:.1f}s)", markup=False, highlight=False, soft_wrap=True)
    demo = Demo(model, tok, model_name, workdir, tokens, max_new_tokens, target=target, translator=translator,
                conversion_dir=cache_dir() / "conversions" / f"{model_name}-mla-2x")
    results = run_steps(demo, chosen, console)
    done = f"total {time.perf_counter() - t0:.1f}s (model loading and the comparison runs included)"
    if any(r.bytes_per_token is not None for r in results):
        png = plot_demo_summary(results, workdir / "demo-summary.png", model_name)
        done = f"summary plot: {png}; saved states in {workdir}; " + done
    console.print(done, markup=False, highlight=False, soft_wrap=True)
    return results
