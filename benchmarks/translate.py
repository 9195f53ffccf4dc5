"""Cross-model KV translation (replace mode), fitted and measured on held-out text.

Fits a ridge translator source -> target on pieces of the calibration split, then on held-out pieces of
the eval split scores the target's perplexity on a continuation given: its own prefill of the context
(upper bound), the translated source cache (the target never reads the context), the translation with
each ``--recompute`` share of its tokens re-read by the target, another piece's translated context
(control), and no context (lower bound). "Gap recovered" = (PPL_none - PPL_x) / (PPL_none - PPL_own).
Passage QA (``kvforge.eval.qa``, exact match, and whether the answer appears in the reply's first line) for
the same conditions, and for each share with the target's own cached instruction and worked example as the
context's opening (``own_prefix=``: a prefix-cache hit) and only the passage translated. Times source prefill + translation
vs target prefill, and translation (+ recomputation) as a share of the target's own prefill at
``--time-lengths``; the file size next to source-only maps of the same pair.

    python benchmarks/translate.py                                      # smollm2-135m -> gemma3-270m
    python benchmarks/translate.py --source gemma3-270m --target smollm2-135m

Each run writes a new folder under ``--out`` (default benchmarks/results), named after its settings and never
overwritten (``kvforge.results``): ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")

import torch  # noqa: E402

from kvforge import load_model, run  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.texts import load_text  # noqa: E402
from kvforge.texts import text_pieces as pieces  # noqa: E402
from kvforge.translate import Translator, TranslatorConfig, calibration_texts, fit  # noqa: E402
from kvforge.translate.evaluate import continuation_token_nll, prefill_state  # noqa: E402
from kvforge.translate.recompute import SELECT  # noqa: E402
from kvforge.translate.registry import weights_path  # noqa: E402

BUCKETS = [(0, 16), (16, 48), (48, 128)]  # continuation token ranges: does the benefit decay?
SHORT = (16, 64)  # the smallest cache that still helps: only the context's last N target tokens
OPEN = [*(f"layers {p} translated, rest own" for p in ("first third", "middle third", "last third")),
        "first half translated, second half read by the target", *(f"last {n} tokens, {w}" for n in SHORT
                                                                     for w in ("own", "translated"))]


@torch.inference_mode()
def open_question_states(tr, src, s_tok, tgt, t_tok, ctx: str, own, translated) -> dict:
    """The seed's open questions as pasts to continue from, each ``(state, last token)``: only some layers
    translated (the others the target's own), a context whose first half comes from the source and second
    half from the target reading on top of it, and only the last few tokens of the context."""
    from kvforge import KVState

    t_ids = t_tok(ctx, return_tensors="pt").input_ids[0]
    n = len(t_ids) - 1  # the past: the context minus its last token
    out = {}
    layers = len(own.layers)
    for k, name in enumerate(OPEN[:3]):
        lo, hi = k * layers // 3, (k + 1) * layers // 3
        mixed = [translated.layers[i] if lo <= i < hi else own.layers[i] for i in range(layers)]
        out[name] = (KVState(mixed, own.token_ids, own.positions, list(own.layer_types), own.fingerprint,
                             sliding_window=own.sliding_window, num_model_layers=layers), t_ids[-1])
    h = n // 2
    cache = translated[:h].to_cache(tgt)
    run.prefill(tgt, t_ids[None, h:n], cache, start=h)  # the target reads the second half on top
    out[OPEN[3]] = (KVState.from_cache(cache, tgt, t_ids[None, :n]), t_ids[-1])
    for m in SHORT:
        piece = t_tok.decode(t_ids[-m:], skip_special_tokens=True)
        ids = t_tok(piece, return_tensors="pt").input_ids[0]
        short = tr.translate(prefill_state(src, s_tok(piece, return_tensors="pt").input_ids[0]), piece, src, tgt,
                             s_tok, t_tok)
        out[f"last {m} tokens, own"] = (prefill_state(tgt, ids[:-1]), ids[-1])
        out[f"last {m} tokens, translated"] = (short[: len(ids) - 1], ids[-1])
    return out


def source_only_twin(tr: Translator) -> Translator:
    """A translator of ``tr``'s pair and layer map with source-only maps (format 1's shapes: no window, no
    token-local features), random weights: its translation time and file size are those of the earlier maps."""
    from dataclasses import asdict

    cfg = TranslatorConfig(**{**asdict(tr.config), "window": 1, "window_rank": 0, "token_rank": 0, "neighbours": 0})
    return Translator(cfg)


def file_mib(tr: Translator) -> float:
    """Size of ``tr`` saved as shipped (float16), MiB."""
    with tempfile.TemporaryDirectory() as d:
        tr.save(Path(d) / "t.safetensors", dtype=torch.float16)
        return os.path.getsize(Path(d) / "t.safetensors") / 2**20


@torch.inference_mode()
def recompute_times(src, s_tok, tgt, t_tok, tr, twin, text: str, fractions, lengths, select: str) -> list[dict]:
    """Translation (+ recomputation of each share of the tokens) against the target's own prefill of the same
    text, best of 2, at each context length in target tokens."""
    rows = []
    for n in lengths:
        ids = t_tok(text, return_tensors="pt").input_ids[0][:n]
        piece = t_tok.decode(ids, skip_special_tokens=True)
        st = prefill_state(src, s_tok(piece, return_tensors="pt").input_ids[0])
        t_ids = t_tok(piece, return_tensors="pt").input_ids[0]
        row = {"target_tokens": len(t_ids), "target_prefill": float("inf"), "source_only_maps": float("inf")}
        for _ in range(2):
            t = time.perf_counter()
            prefill_state(tgt, t_ids)
            row["target_prefill"] = min(row["target_prefill"], time.perf_counter() - t)
            t = time.perf_counter()
            twin.translate(st, piece, src, tgt, s_tok, t_tok)
            row["source_only_maps"] = min(row["source_only_maps"], time.perf_counter() - t)
            for f in fractions:
                t = time.perf_counter()
                tr.translate(st, piece, src, tgt, s_tok, t_tok, recompute=f, select=select)
                row[f"translate+{f:g}"] = min(row.get(f"translate+{f:g}", float("inf")), time.perf_counter() - t)
        rows.append(row)
        print(f"time at {len(t_ids)} tokens: target prefill {row['target_prefill']:.2f}s, "
              + ", ".join(f"{k} {v / row['target_prefill']:.0%}" for k, v in row.items() if k.startswith("translate")),
              flush=True)
    return rows


@torch.inference_mode()
def ttft(src, s_tok, tgt, t_tok, tr, text: str, lengths=(256, 1024, 4096)) -> list[dict]:
    """Time to the target's first token: source prefill + translation + one target step, vs target prefill."""
    rows = []
    for n in lengths:
        ids = t_tok(text, return_tensors="pt").input_ids[0][:n]
        piece = t_tok.decode(ids, skip_special_tokens=True)
        s_ids = s_tok(piece, return_tensors="pt").input_ids[0]
        t_ids = t_tok(piece, return_tensors="pt").input_ids[0]
        best = {}
        for _ in range(2):
            t = time.perf_counter()
            st = prefill_state(src, s_ids)
            t_src = time.perf_counter() - t
            t = time.perf_counter()
            translated = tr.translate(st, piece, src, tgt, s_tok, t_tok)
            t_tr = time.perf_counter() - t
            t = time.perf_counter()
            continuation_token_nll(tgt, translated[: len(t_ids) - 1], t_ids[-1], t_ids[-1:])
            t_step = time.perf_counter() - t
            t = time.perf_counter()
            prefill_state(tgt, t_ids)
            t_tgt = time.perf_counter() - t
            cur = {"target_tokens": len(t_ids), "source_prefill": t_src, "translate": t_tr, "target_step": t_step,
                   "target_prefill": t_tgt}
            best = cur if not best or t_src + t_tr < best["source_prefill"] + best["translate"] else best
        rows.append(best)
    return rows


def qa(src, s_tok, tgt, t_tok, tr, fuse, n: int, fractions, select: str) -> dict:
    """Exact match on the passage QA set: the target answers from each kind of past (the translation with
    each share of recomputed tokens)."""
    from kvforge import prefill
    from kvforge.eval.qa import DEMO, answer_in_reply, qa_exact_match, qa_set
    from kvforge.translate.recompute import own_prefix_state

    items = qa_set(n)

    def own_prefix(item):
        """The target's own state of the instruction and worked example (every item's same opening: what a
        prefix cache holds), cut at a token boundary of the whole context."""
        return own_prefix_state(tgt, t_tok, item.context, len(DEMO))

    def translated(item, with_tr=tr, own=False, recompute=0.0, prefix=False):
        st = prefill(src, s_tok, item.context)
        return with_tr.translate(st, item.context, src, tgt, s_tok, t_tok,
                                 own=prefill(tgt, t_tok, item.context) if own else None, recompute=recompute,
                                 select=select,
                                 own_prefix=own_prefix(item) if prefix else None)

    conds = {"own prefill": lambda it: prefill(tgt, t_tok, it.context)}
    for f in fractions:
        conds[recompute_name(f)] = (lambda it, f=f: translated(it, recompute=f))
    for f in fractions:
        conds[f"own instruction prefix + {recompute_name(f)}"] = (
            lambda it, f=f: translated(it, recompute=f, prefix=True))
    if fuse is not None:
        conds["fused"] = lambda it: translated(it, fuse, own=True)
    conds["control: another passage translated"] = lambda it: translated(items[(items.index(it) + 1) % len(items)])
    conds["no context"] = lambda it: None
    out = {}
    for name, fn in conds.items():
        r = qa_exact_match(tgt, t_tok, items, fn)
        found = sum(answer_in_reply(p, it.answer) for p, it in zip(r.predictions, items))
        out[name] = {"exact_match": r.exact_match, "correct": r.correct, "total": r.total, "answer_in_reply": found,
                     "per_kind": r.per_kind(items), "predictions": r.predictions}
        print(f"QA {name}: {r.correct}/{r.total} exact, answer in the reply {found}/{r.total}", flush=True)
    src_own = qa_exact_match(src, s_tok, items, lambda it: prefill(src, s_tok, it.context))
    out["source model, own prefill"] = {
        "exact_match": src_own.exact_match, "correct": src_own.correct, "total": src_own.total,
        "answer_in_reply": sum(answer_in_reply(p, it.answer) for p, it in zip(src_own.predictions, items)),
        "per_kind": src_own.per_kind(items)}
    return out


def recompute_name(f: float) -> str:
    return "translated (replace)" if not f else f"translated, {100 * f:g}% recomputed"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--fit-pieces", type=int, default=96, help="calibration pieces of --piece-chars")
    ap.add_argument("--piece-chars", type=int, default=1400)
    ap.add_argument("--strategy", default="nearest")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--sliding-sources", action="store_true",
                    help="let sliding-window source layers feed the map (contexts must fit their window)")
    ap.add_argument("--eval-pieces", type=int, default=16)
    ap.add_argument("--context-chars", type=int, default=1000)
    ap.add_argument("--score-tokens", type=int, default=128)
    ap.add_argument("--translator", type=Path, help="load instead of fitting (e.g. one from `translate train`)")
    ap.add_argument("--shipped", action="store_true",
                    help="use the shipped translators of the pair (replace, and fuse where one ships)")
    ap.add_argument("--fuse", type=Path, help="a fuse-mode translator (`translate train --mode fuse`) to measure too")
    ap.add_argument("--qa-items", type=int, default=40, help="passage QA items (0: skip QA)")
    ap.add_argument("--recompute", default="0,0.05,0.1,0.25",
                    help="shares of the context's tokens the target recomputes over the translation (comma-separated)")
    ap.add_argument("--select", choices=SELECT, default="sentence",
                    help="which tokens each --recompute share re-reads (Translator.translate's select)")
    ap.add_argument("--time-lengths", default="256,1024,4096", help="context lengths (target tokens) timed")
    ap.add_argument("--no-open-questions", action="store_true", help="skip layer subsets, mixing, smallest cache")
    ap.add_argument("--save", type=Path, help="save the fitted translator here")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    name = folder_name(f"translate-{args.source}-to-{args.target}", settings,
                      "shipped" if args.shipped else "loaded" if args.translator else args.strategy,
                      f"e{args.eval_pieces}x{args.context_chars}+{args.score_tokens}",
                      f"qa{args.qa_items}", f"select-{args.select}")
    record = Results(args.out, name, settings)

    src, s_tok = load_model(args.source)
    tgt, t_tok = load_model(args.target)
    t0 = time.perf_counter()
    if args.shipped:
        args.translator = weights_path(args.source, args.target)
        if args.fuse is None and weights_path(args.source, args.target, "fuse").exists():
            args.fuse = weights_path(args.source, args.target, "fuse")
    if args.translator:
        tr = Translator.load(args.translator)
        tr.check_pair(src, tgt)
    else:
        texts = calibration_texts(args.fit_pieces, args.piece_chars)
        tr = fit(src, tgt, s_tok, t_tok, texts, strategy=args.strategy, k=args.k, ridge=args.ridge,
                 source_name=args.source, target_name=args.target, sliding_sources=args.sliding_sources)
        if args.save:
            tr.save(args.save)
    fit_s = time.perf_counter() - t0

    fuse = Translator.load(args.fuse) if args.fuse else None
    if fuse is not None:
        fuse.check_pair(src, tgt)
    ev = load_text("pydoc", "eval")
    ctxs = pieces(ev, args.eval_pieces, args.context_chars)
    fractions = [float(f) for f in args.recompute.split(",")]
    extra = [f for f in fractions if f]
    conds = {"own": [0.0, 0], "translated": [0.0, 0], **{recompute_name(f): [0.0, 0] for f in extra}, **({"fused": [0.0, 0], "fused control": [0.0, 0]} if fuse else {}),
             "control": [0.0, 0], "none": [0.0, 0]}
    opens = {} if args.no_open_questions else {k: [0.0, 0] for k in OPEN}
    times = {"source_prefill": 0.0, "translate": 0.0, "target_prefill": 0.0}
    buckets = {k: [[0.0, 0] for _ in BUCKETS] for k in conds}
    bos = torch.tensor(run.prompt_prefix(t_tok), dtype=torch.long)  # what the target's prompts start with
    none_state = prefill_state(tgt, bos) if len(bos) else None
    for i, ctx in enumerate(ctxs):
        # the continuation: the text after this context (the next piece), in target tokens
        nxt = ctxs[i + 1] if i + 1 < len(ctxs) else pieces(ev, 1, args.context_chars, ev.find(ctx) + len(ctx))[0]
        cont = t_tok(nxt, add_special_tokens=False, return_tensors="pt").input_ids[0][: args.score_tokens]
        t_ids = t_tok(ctx, return_tensors="pt").input_ids[0]
        s_ids = s_tok(ctx, return_tensors="pt").input_ids[0]
        t = time.perf_counter()
        own = prefill_state(tgt, t_ids[:-1])
        times["target_prefill"] += time.perf_counter() - t
        t = time.perf_counter()
        s_state = prefill_state(src, s_ids)
        times["source_prefill"] += time.perf_counter() - t
        t = time.perf_counter()
        translated = tr.translate(s_state, ctx, src, tgt, s_tok, t_tok)
        times["translate"] += time.perf_counter() - t
        other = ctxs[(i + len(ctxs) // 2) % len(ctxs)]
        control = tr.translate(prefill_state(src, s_tok(other, return_tensors="pt").input_ids[0]), other, src, tgt,
                               s_tok, t_tok)
        last = t_ids[-1]
        states = {"own": own, "translated": translated[: len(t_ids) - 1], "control": control[: control.num_tokens - 1],
                  "none": none_state}
        for f in extra:
            states[recompute_name(f)] = tr.translate(s_state, ctx, src, tgt, s_tok, t_tok, recompute=f,
                                                     select=args.select)[: len(t_ids) - 1]
        if fuse is not None:
            own_full = prefill_state(tgt, t_ids)
            states["fused"] = fuse.translate(s_state, ctx, src, tgt, s_tok, t_tok, own=own_full)[: len(t_ids) - 1]
            # control: the same gate mixes in another (longer) context's translation, cut to this length
            longer = other + " " + ctxs[(i + len(ctxs) // 2 + 1) % len(ctxs)]
            wrong = fuse.translated(prefill_state(src, s_tok(longer, return_tensors="pt").input_ids[0]), longer,
                                    src, tgt, s_tok, t_tok)[: len(t_ids)]
            wrong.token_ids = own_full.token_ids
            states["fused control"] = fuse.fuse(own_full, wrong)[: len(t_ids) - 1]
        for name in conds:
            tok_nll = continuation_token_nll(tgt, states[name], last, cont)
            conds[name][0] += tok_nll.sum().item()
            conds[name][1] += len(cont)
            for b, (lo, hi) in enumerate(BUCKETS):
                part = tok_nll[lo:hi]
                buckets[name][b][0] += part.sum().item()
                buckets[name][b][1] += len(part)
        if opens:
            for name, (st, lt) in open_question_states(tr, src, s_tok, tgt, t_tok, ctx, own,
                                                        states["translated"]).items():
                opens[name][0] += continuation_token_nll(tgt, st, lt, cont).sum().item()
                opens[name][1] += len(cont)
        print(f"piece {i + 1}/{len(ctxs)}: " + ", ".join(f"{k} {math.exp(v[0] / v[1]):.3f}" for k, v in conds.items()),
              flush=True)

    ppl = {k: math.exp(v[0] / v[1]) for k, v in conds.items()}
    bucket_ppl = {k: [math.exp(a / n) if n else float("nan") for a, n in v] for k, v in buckets.items()}
    bucket_gap = [(bucket_ppl["none"][b] - bucket_ppl["translated"][b]) / (bucket_ppl["none"][b] - bucket_ppl["own"][b])
                  for b in range(len(BUCKETS))]
    speed = ttft(src, s_tok, tgt, t_tok, tr, ev[200_000:])
    twin = source_only_twin(tr)
    lengths = [int(x) for x in args.time_lengths.split(",")]
    rtimes = recompute_times(src, s_tok, tgt, t_tok, tr, twin, ev[200_000:], fractions, lengths, args.select)
    sizes = {"this translator": file_mib(tr), "source-only maps (format 1 shapes)": file_mib(twin)}
    gap = {k: (ppl["none"] - ppl[k]) / (ppl["none"] - ppl["own"]) for k in conds if k not in ("own", "none")}
    open_ppl = {k: math.exp(a / n) for k, (a, n) in opens.items()}
    qa_res = qa(src, s_tok, tgt, t_tok, tr, fuse, args.qa_items, fractions, args.select) if args.qa_items else {}
    lines = [
        f"# KV translation {args.source} -> {args.target} (replace mode, ridge fit"
        + (f" + {tr.config.trained_steps} KL-distillation steps" if tr.config.trained_steps else "")
        + f"; strategy {tr.config.strategy}, "
        f"k={tr.config.k}, fitted on {tr.config.tokens_fitted:,} target tokens"
        + (f", loaded from {record.relative(args.translator)})" if args.translator else f" in {fit_s:.0f}s)"),
        "",
        f"{len(ctxs)} held-out contexts of ~{args.context_chars} characters from the eval split; the next "
        f"{args.score_tokens} target tokens scored.",
        "",
        "| condition | target PPL | gap recovered |",
        "|---|---|---|",
        f"| own prefill (upper bound) | {ppl['own']:.3f} | 100% |",
        f"| translated source cache | {ppl['translated']:.3f} | {100 * gap['translated']:.0f}% |",
        *[f"| translated, {100 * f:g}% of the tokens recomputed by the target | {ppl[recompute_name(f)]:.3f} | "
          f"{100 * gap[recompute_name(f)]:.0f}% |" for f in extra],
        *([f"| fused into own prefill (fuse mode) | {ppl['fused']:.3f} | {100 * gap['fused']:.0f}% |",
           f"| control: fused with another context's translation | {ppl['fused control']:.3f} | "
           f"{100 * gap['fused control']:.0f}% |"] if fuse else []),
        f"| control: another context translated | {ppl['control']:.3f} | {100 * gap['control']:.0f}% |",
        f"| no context (lower bound) | {ppl['none']:.3f} | 0% |",
        "",
        f"Time over all contexts: source prefill {times['source_prefill']:.2f}s, translation {times['translate']:.2f}s "
        f"({100 * times['translate'] / times['source_prefill']:.0f}% of the source prefill), target prefill "
        f"{times['target_prefill']:.2f}s.",
        "",
        "Does the benefit decay over the continuation? Gap recovered per range of scored tokens:",
        "",
        "| tokens | own PPL | translated PPL | none PPL | gap recovered |",
        "|---|---|---|---|---|",
        *[f"| {lo}-{hi} | {bucket_ppl['own'][b]:.2f} | {bucket_ppl['translated'][b]:.2f} | {bucket_ppl['none'][b]:.2f} "
          f"| {100 * bucket_gap[b]:.0f}% |" for b, (lo, hi) in enumerate(BUCKETS)],
        "",
        "Time to first token: the source reads the context and its cache is translated, vs the target reading it:",
        "",
        "| target tokens | source prefill | translation | translation / source prefill | source + translation + 1 step vs target prefill |",
        "|---|---|---|---|---|",
        *[f"| {r['target_tokens']} | {r['source_prefill']:.2f}s | {r['translate']:.3f}s | "
          f"{100 * r['translate'] / r['source_prefill']:.1f}% | "
          f"{(r['source_prefill'] + r['translate'] + r['target_step']) / r['target_prefill']:.2f}x |" for r in speed],
    ]
    lines += ["", "Translation (+ recomputation) time as a share of the target's own prefill of the same context "
              "(best of 2; the source's prefill is not counted: the source has already read the context):", "",
              "| target tokens | target prefill | source-only maps | " + " | ".join(
                  "translation" if not f else f"+ {100 * f:g}% recomputed" for f in fractions) + " |",
              "|---|---|---|" + "---|" * len(fractions),
              *[f"| {r['target_tokens']} | {r['target_prefill']:.2f}s | {r['source_only_maps'] / r['target_prefill']:.1%} | "
                + " | ".join(f"{r[f'translate+{f:g}'] / r['target_prefill']:.1%}" for f in fractions) + " |"
                for r in rtimes],
              "", "File size (float16, as shipped): " + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items()) + "."]
    if qa_res:
        lines += ["", f"Passage QA ({args.qa_items} invented facts, exact match; the target answers "
                  "`Question: ...\\nAnswer:` after the passage; \"answer in the reply\": the answer appears in the "
                  "reply's first line, phrased or not; \"own instruction prefix\": the target's own cache of the "
                  "instruction and worked example that open every context, as a prefix cache holds it, and the "
                  f"passage translated; recomputed shares count all the context's tokens, chosen by "
                  f"select={args.select!r}):", "",
                  "| condition | exact match | correct | answer in the reply |", "|---|---|---|---|",
                  *[f"| {k} | {100 * v['exact_match']:.1f}% | {v['correct']}/{v['total']} | "
                    f"{v.get('answer_in_reply', 0)}/{v['total']} |" for k, v in qa_res.items()]]
    if open_ppl:
        lines += ["", "Open questions (same contexts and continuations; PPL of the target, gap recovered against "
                  "no context and own prefill of the whole context):", "",
                  "| past | target PPL | gap recovered |", "|---|---|---|",
                  *[f"| {k} | {v:.3f} | {100 * (ppl['none'] - v) / (ppl['none'] - ppl['own']):.0f}% |"
                    for k, v in open_ppl.items()]]
    text = "\n".join(lines)
    print(text)
    record.write_table(text, ppl=ppl, gap=gap, qa=qa_res, open_questions=open_ppl, times=times, buckets=bucket_ppl,
                    bucket_gap=bucket_gap, ttft=speed, config=tr.config.__dict__, fit_seconds=fit_s,
                    recompute_times=rtimes, file_mib=sizes)
    record.announce()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
