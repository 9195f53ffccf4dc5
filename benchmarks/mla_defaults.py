"""Choosing ``kvforge mla convert``'s defaults on more than one text, and checking them on texts not chosen on.

Each candidate is a joint conversion at one ratio with one setting of the knobs that the conversion has
(calibration texts, output-aware weighting, the keys' weight in the joint latent, bias correction, rank
allocation, calibration pieces),
scored by decode-faithful perplexity (4 windows, 512 prefilled + 512 scored in chunks of 32) against the
unconverted model on the same windows of every text.

``--split choose`` scores on the calibration parts of the choosing texts (default kjv and fortunes; a
text of the calibration mix is scored after the characters a conversion's pieces read from it, so no
scored token was calibrated on; jargon stays wholly held out); ``--split eval`` scores on the evaluation parts (the check: run it on every text once the
choice is made). Each run writes a new folder under ``--out`` (``kvforge.results``).

    python benchmarks/mla_defaults.py --split choose                     # the choice
    python benchmarks/mla_defaults.py --split eval --texts all --candidates old,new   # the check
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KVFORGE_QUIET", "1")

from kvforge import load_model  # noqa: E402
from kvforge.eval import perplexity  # noqa: E402
from kvforge.mla import compression, convert  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.run import token_windows  # noqa: E402
from kvforge.texts import (  # noqa: E402
    CALIBRATION_MIX,
    _split_point,  # the cut the calibration part starts from
    calibration_pieces,
    load_text,
    pydoc_text,
    text_names,
    text_pieces,
)


def OLD_PYDOC_CALIBRATION() -> str:  # noqa: N802 - the text the old default read: pydoc's whole first fifth
    text = pydoc_text()
    return text[: _split_point(text)]

# name -> calibration texts, calibration pieces and convert()'s settings. "old" is the default before issue
# 17 (32 pieces of the pydoc text's first fifth, as the calibration part was then), "round2" the default of
# its second round (mix-kw1); "new" is the current default (fisher-d0.5-oc1), which convert() picks at 2x
# by itself. Each names every setting, so a row means the same thing whatever the defaults become.
_R2 = {"output_aware": True, "bias_correction": False, "allocation": "spectrum", "refine": 0, "output_correction": False}
CANDIDATES = {
    "old": {"cal": "pydoc-old", "pieces": 32, **_R2, "key_weight": 1.5},
    "mix": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 1.5},
    "mix-kw1": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 1.0},
    "mix-kw2": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 2.0},
    "mix-kw0.75": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 0.75},
    "mix-kw0.5": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 0.5},
    "mix-plain": {"cal": "mix", "pieces": 32, **_R2, "output_aware": False, "key_weight": 1.5},
    "mix-24": {"cal": "mix", "pieces": 24, **_R2, "key_weight": 1.5},
    "bc": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 1.0, "bias_correction": True},
    "bc-uniform": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 1.0, "bias_correction": True,
                   "allocation": "uniform"},
    "bc-uniform-kw0.75": {"cal": "mix", "pieces": 32, **_R2, "key_weight": 0.75, "bias_correction": True,
                          "allocation": "uniform"},
    "fisher-bc-uniform": {"cal": "mix", "pieces": 32, "output_aware": "fisher", "key_weight": 1.0,
                          "bias_correction": True, "allocation": "uniform", "fisher_damping": 0.0, "refine": 0,
                          "output_correction": False},
    "fisher-bc-spectrum": {"cal": "mix", "pieces": 32, "output_aware": "fisher", "key_weight": 1.0,
                           "bias_correction": True, "allocation": "spectrum", "fisher_damping": 0.0, "refine": 0,
                           "output_correction": False},
}
for _d in (0.2, 0.5, 1.0):  # Fisher damped towards the query/o_proj weights
    CANDIDATES[f"fisher-d{_d:g}"] = {**CANDIDATES["fisher-bc-uniform"], "fisher_damping": _d}
CANDIDATES["fisher-d0.5-spectrum"] = {**CANDIDATES["fisher-d0.5"], "allocation": "spectrum"}
CANDIDATES["fisher-d0.5-s4"] = {**CANDIDATES["fisher-d0.5"], "fisher_samples": 4}
for _r in (1, 2):  # and the statistics read again on the converted model
    CANDIDATES[f"fisher-d0.5-r{_r}"] = {**CANDIDATES["fisher-d0.5"], "refine": _r}
CANDIDATES["fisher-d0.5-oc"] = {**CANDIDATES["fisher-d0.5"], "output_correction": "local",  # o_proj refitted
                                "correction_damping": 0.01}
for _d in (0.001, 0.1, 0.3, 1.0):
    CANDIDATES[f"fisher-d0.5-oc{_d:g}"] = {**CANDIDATES["fisher-d0.5-oc"], "correction_damping": _d}
CANDIDATES["fisher-d0.5-ocg"] = {**CANDIDATES["fisher-d0.5-oc"], "output_correction": "global"}
CANDIDATES["round2"] = CANDIDATES["mix-kw1"]
PIECE_CHARS = 2200


def _refit(row: dict) -> str:  # rows of runs before the damping was a candidate's setting used 0.01
    oc = row.get("output_correction")
    return f"{oc}, damping {row.get('correction_damping', 0.01):g}" if oc else "off"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=2.0)
    ap.add_argument("--split", choices=["choose", "eval"], default="choose")
    ap.add_argument("--texts", default=None, help="default: pydoc,kjv for choose, all for eval")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help=f"of {', '.join(CANDIDATES)}")
    ap.add_argument("--new", default="fisher-d0.5-oc1", help="the candidate that is the new default (reported as 'new')")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    CANDIDATES["new"] = CANDIDATES[args.new]
    names = [c for c in args.candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    texts = text_names(args.texts or ("kjv,fortunes" if args.split == "choose" else "all"))
    settings = {**vars(args), "texts": texts, "candidates": {n: CANDIDATES[n] for n in names}}
    res = Results(args.out, folder_name("mla-defaults", settings, args.model, f"r{args.ratio:g}", args.split), settings)

    model, tok = load_model(args.model)
    # the furthest a conversion reads into a calibration part of the mix: its pieces, taken in turn per text
    skip = -(-max(c["pieces"] for c in CANDIDATES.values()) // len(CALIBRATION_MIX)) * PIECE_CHARS
    windows = {}
    for t in texts:
        if args.split == "eval":
            body = load_text(t, "eval")
        else:
            body = load_text(t, "calibration")[skip if t in CALIBRATION_MIX else 0:]
            if t == "pydoc":
                raise SystemExit("pydoc cannot be a choosing text: the old default calibrated on all its first fifth")
        windows[t] = token_windows(tok, body, 4, 1024)
    base = {t: perplexity(model, tok, "dynamic", windows=w, context=512, score=512, chunk=32, show_progress=False)
            for t, w in windows.items()}
    rows = []
    for name in names:
        c = dict(CANDIDATES[name])
        cal, pieces = c.pop("cal"), c.pop("pieces")
        m, _ = load_model(args.model)
        t0 = time.perf_counter()
        cal_pieces = (text_pieces(OLD_PYDOC_CALIBRATION(), pieces, PIECE_CHARS) if cal == "pydoc-old"
                      else calibration_pieces(cal, pieces, PIECE_CHARS))
        convert(m, tok, ratio=args.ratio, method="joint", calibration=cal_pieces, **c)
        row = {"candidate": name, "calibration": cal, "pieces": pieces, **c,
               "compression": compression(m), "convert_s": round(time.perf_counter() - t0, 1), "rel_change": {}}
        for t, w in windows.items():
            r = perplexity(m, tok, "dynamic", windows=w, context=512, score=512, chunk=32, baseline=base[t],
                           show_progress=False)
            row["rel_change"][t] = r.rel_change
        ch = row["rel_change"]
        row["mean"], row["worst_text"] = sum(ch.values()) / len(ch), max(ch, key=ch.get)
        row["worst"] = ch[row["worst_text"]]
        rows.append(row)
        print(name, {k: f"{100 * v:+.2f}%" for k, v in ch.items()}, f"worst {100 * row['worst']:+.2f}%", flush=True)

    head = ("| candidate | calibration | weighting | key weight | bias correction | ranks | refine | o_proj refit | "
            "pieces | convert s | "
            + " | ".join(texts) + " | mean | worst |")
    lines = [f"# MLA joint {args.ratio:g}x on {args.model}: decode-faithful ΔPPL ({args.split} windows)", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        aware = {True: "queries/o_proj", False: "off", "fisher": f"Fisher, damping {r.get('fisher_damping', 0):g}"}[
            r["output_aware"]]
        lines.append(f"| {r['candidate']} | {r['calibration']} | {aware} | {r['key_weight']} | "
                     f"{'on' if r['bias_correction'] else 'off'} | {r['allocation']} | {r.get('refine', 0)} | "
                     f"{_refit(r)} | {r['pieces']} | "
                     f"{r['convert_s']} | "
                     + " | ".join(f"{100 * r['rel_change'][t]:+.2f}%" for t in texts)
                     + f" | {100 * r['mean']:+.2f}% | {100 * r['worst']:+.2f}% ({r['worst_text']}) |")
    lines += ["", "baseline PPL: " + ", ".join(f"{t} {b.ppl:.3f}" for t, b in base.items())]
    res.write_table("\n".join(lines), rows=rows)
    print("\n".join(lines))
    res.announce()


if __name__ == "__main__":
    main()
