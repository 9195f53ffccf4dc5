"""Which tokens should the target re-read over a translated cache? Passage QA by recompute selection.

The shipped replace translator translates each QA context (instruction, worked example, passage); the target
then re-reads ``--fraction`` of the context's tokens chosen by each rule below and answers the question.
Rules that a user can run (``trust``, ``last``, ``rare``, ``hybrid``, ``rare-span``, ``query``) are compared
with two oracles that know where the answer is (``oracle-answer``: the answer's own tokens; ``oracle-sentence``:
the whole sentence that states the fact, whatever its share) and with the target's own cached instruction
prefix first (``prefix+RULE``, what ``Translator.translate(own_prefix=...)`` does before its selection).

- ``rare``: the tokens least frequent in the calibration parts of the mix (the target's tokenizer, 400k
  characters of each text);
- ``hybrid``: the sum of the trust and rarity ranks;
- ``rare-span``: rarity averaged over 7 neighbouring tokens (re-read contiguous stretches);
- ``sentence``: whole sentences, the least trusted on average first (``select="sentence"`` of the library);
- ``query``: the context tokens the question's tokens attend to most over the translated cache (every layer
  and head, eager attention), averaged over 5 neighbours: the target reads the question first.

    python benchmarks/translate_select.py                       # smollm2-135m -> gemma3-270m, 10%, 40 items
    python benchmarks/translate_select.py --translator s2t.safetensors --rules none,prefix+none,prefix+sentence
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvforge import load_model, prefill, run  # noqa: E402
from kvforge.eval.qa import DEMO, answer_in_reply, qa_exact_match, qa_set  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.texts import CALIBRATION_MIX, calibration_text  # noqa: E402
from kvforge.translate import Translator, load  # noqa: E402
from kvforge.translate.recompute import (  # noqa: E402
    by_sentence,
    choose,
    own_prefix_state,
    recompute,
    sentence_ids,
    splice_prefix,
)

BASE = ("none", "trust", "last", "rare", "hybrid", "rare-span", "query", "sentence", "oracle-answer",
        "oracle-sentence")
RULES = (*BASE, *(f"prefix+{r}" for r in BASE))
DEFAULT = ("none", "trust", "last", "rare", "hybrid", "rare-span", "query", "sentence", "oracle-answer",
           "oracle-sentence", "prefix+trust", "prefix+sentence")


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks in [0, 1) (non-finite values lowest)."""
    x = x.clone()
    finite = torch.isfinite(x)
    x[~finite] = x[finite].min() - 1 if finite.any() else 0
    r = torch.empty(len(x))
    r[x.argsort()] = torch.arange(len(x), dtype=torch.float)
    return r / len(x)


def smooth(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.avg_pool1d(x[None, None], width, 1, width // 2, count_include_pad=False)[0, 0][: len(x)]


def char_span_tokens(tok, text: str, lo: int, hi: int, shift: int) -> list[int]:
    """Positions (specials at the start counted by ``shift``) of the tokens overlapping ``text[lo:hi]``."""
    off = tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    return [j + shift for j, (a, b) in enumerate(off) if a < hi and b > lo]


def query_attention(tgt, t_tok, state, item, n: int, index: torch.Tensor) -> torch.Tensor:
    """``[n]`` attention the question's tokens pay each context token over ``state`` (specials masked),
    normalised per query, head and layer, summed."""
    cache = state.to_cache(tgt)
    p = t_tok(item.prompt, add_special_tokens=False, return_tensors="pt").input_ids
    impl = tgt.config._attn_implementation
    tgt.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = run.forward(tgt, p, cache, start=n, output_attentions=True)
    finally:
        tgt.set_attn_implementation(impl)
    att = torch.zeros(n)
    for a in out.attentions:
        x = a[0, :, :, :n].float().masked_fill((index < 0)[None, None], 0)
        att += (x / x.sum(-1, keepdim=True).clamp_min(1e-9)).mean(0).sum(0)
    return att


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--target", default="gemma3-270m")
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the context's tokens re-read")
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--rules", default=",".join(DEFAULT),
                    help=f"comma-separated, from {', '.join(BASE)}, each also as prefix+RULE (the target's own "
                         "instruction prefix first)")
    ap.add_argument("--translator", type=Path, help="a translator file (`kvforge translate train`) instead of the shipped")
    ap.add_argument("--seed", type=int, default=0, help="QA set seed (0: the set benchmarks/translate.py reads)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    rules = args.rules.split(",")
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        ap.error(f"unknown rule(s) {', '.join(unknown)}; choose from {', '.join(RULES)}")
    if not 0 < args.fraction < 1:
        ap.error(f"--fraction is a share of the tokens, between 0 and 1; got {args.fraction}")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    record = Results(args.out, folder_name(f"translate-select-{args.source}-to-{args.target}", settings,
                                           f"f{args.fraction:g}", f"qa{args.items}", *([f"seed{args.seed}"] if args.seed else [])),
                                settings)
    torch.set_num_threads(1)
    src, s_tok = load_model(args.source)
    tgt, t_tok = load_model(args.target)
    if args.translator:
        tr = Translator.load(args.translator)
        tr.check_pair(src, tgt)
    else:
        tr = load(args.source, args.target, src, tgt)
    counts = collections.Counter()
    for name in CALIBRATION_MIX:
        counts.update(t_tok(calibration_text(name)[:400_000], add_special_tokens=False)["input_ids"])
    items = qa_set(args.items, seed=args.seed)

    def state_for(item, rule):
        inputs = tr.prepare(prefill(src, s_tok, item.context), item.context, src, tgt, s_tok, t_tok)
        out = tr.build_state(tr.project(inputs), inputs.a, tgt)
        with_prefix, rule, start = rule.startswith("prefix+"), rule.removeprefix("prefix+"), 0
        if with_prefix:  # the target's own instruction and worked example, then the rule within the passage
            own = own_prefix_state(tgt, t_tok, item.context, len(DEMO))
            out, start = splice_prefix(out, own), own.num_tokens
        if rule == "none":
            return out
        index, ids = inputs.a.index, inputs.a.target_ids
        n = len(ids)
        shift = n - len(t_tok(item.context, add_special_tokens=False)["input_ids"])
        rare = torch.tensor([-math.log1p(counts[int(t)]) for t in ids])
        if rule == "oracle-sentence":
            c0 = item.context.index(item.answer, len(DEMO))
            lo = max(item.context.rfind(". ", 0, c0) + 1, len(DEMO))  # within the passage
            hi = item.context.find(".", c0) + 1
            idx = torch.tensor(char_span_tokens(t_tok, item.context, lo, hi, shift))
            shares.append(len(idx) / int((index >= 0).sum()))
            return recompute(tgt, out, idx)
        if rule == "oracle-answer":
            c0 = item.context.index(item.answer, len(DEMO))
            score = torch.full((n,), -1e9)
            score[char_span_tokens(t_tok, item.context, c0, c0 + len(item.answer), shift)] = 1.0
            score = score + 1e-3 * rank(rare)  # the answer's tokens, then the rarest
        elif rule == "sentence":
            score = by_sentence(tr.trust_scores(inputs), sentence_ids(t_tok, item.context))
        else:
            score = {"trust": lambda: tr.trust_scores(inputs),
                     "last": lambda: torch.arange(n, dtype=torch.float),
                     "rare": lambda: rare,
                     "hybrid": lambda: rank(tr.trust_scores(inputs)) + rank(rare),
                     "rare-span": lambda: smooth(rank(rare), 7),
                     "query": lambda: smooth(query_attention(tgt, t_tok, out, item, n, index), 5)}[rule]()
        return recompute(tgt, out, choose(index, args.fraction, "trust", score, start=start))  # top scores

    rows, shares = {}, []
    for rule in rules:
        t = time.perf_counter()
        r = qa_exact_match(tgt, t_tok, items, lambda it, rule=rule: state_for(it, rule))
        found = sum(answer_in_reply(p, it.answer) for p, it in zip(r.predictions, items))
        rows[rule] = {"correct": r.correct, "answer_in_reply": found, "total": r.total, "seconds": time.perf_counter() - t,
                      "predictions": r.predictions}
        print(f"{rule}: {r.correct}/{r.total} exact, answer in the reply {found}/{r.total}", flush=True)
    own = qa_exact_match(tgt, t_tok, items, lambda it: prefill(tgt, t_tok, it.context))
    own_found = sum(answer_in_reply(p, it.answer) for p, it in zip(own.predictions, items))
    lines = [f"# Recompute selection, {args.source} -> {args.target} "
             f"({args.translator or 'shipped'} replace translator), "
             f"{100 * args.fraction:g}% of the context's tokens re-read, {args.items} QA items", "",
             "| rule | exact match | answer in the reply |", "|---|---|---|",
             f"| own prefill (upper bound) | {own.correct}/{own.total} | {own_found}/{own.total} |",
             *[f"| {k} | {v['correct']}/{v['total']} | {v['answer_in_reply']}/{v['total']} |" for k, v in rows.items()],
             "", "`oracle-*` rules know where the answer is (diagnostics, not usable); `oracle-sentence` re-reads the "
             "whole fact sentence whatever its share"
             + (f" (on average {100 * sum(shares) / len(shares):.0f}% of the context's tokens)" if shares else "")
             + "; `none`: no tokens re-read."]
    text = "\n".join(lines)
    print(text)
    record.write_table(text, rules=rows, oracle_sentence_share=shares, own={"correct": own.correct, "answer_in_reply": own_found,
                                              "predictions": own.predictions})
    record.announce()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
