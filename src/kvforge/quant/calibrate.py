"""Pick bits from the model: one calibration forward pass, per-layer statistics, recommended bits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .config import QuantConfig
from .kivi import dequantize_keys, dequantize_values, quantize_keys, quantize_values, rotation

BITS = (2, 3, 4, 8)
# relative reconstruction error (||x - q(x)|| / ||x||) a layer's keys / values may have at the chosen
# bits. Values tolerate more: their errors are averaged by the attention weights, while key errors move
# every score before the softmax.
MODES = {"quality": (0.06, 0.11), "balanced": (0.10, 0.20)}


@dataclass
class LayerStats:
    layer: int
    kind: str  # full_attention / sliding_attention
    key_absmax: float
    value_absmax: float
    key_outlier_ratio: float  # largest per-channel |k| max over the median channel's
    value_outlier_ratio: float
    key_outlier_channels: list[int]  # channels over 4x the median
    key_error: dict[int, float]  # bits -> relative error, with the configured rotation
    value_error: dict[int, float]
    key_error_unrotated: dict[int, float]


@dataclass
class CalibrationReport:
    model: str
    tokens: int
    base: QuantConfig
    layers: list[LayerStats] = field(default_factory=list)

    def recommend(self, mode: str = "balanced") -> list[QuantConfig]:
        """Per layer, the fewest key and value bits whose error stays under the mode's threshold."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
        klimit, vlimit = MODES[mode]
        out = []
        for s in self.layers:
            kb = next((b for b in BITS if s.key_error[b] <= klimit), 8)
            vb = next((b for b in BITS if s.value_error[b] <= vlimit), 8)
            vg = self.base.value_group if vb > 2 else min(self.base.value_group, 16)
            out.append(self.base.replace(key_bits=kb, value_bits=vb, value_group=vg))
        return out

    def summary(self, mode: str = "balanced") -> dict:
        rec = self.recommend(mode)
        return {
            "mode": mode,
            "mean_key_bits": sum(c.key_bits for c in rec) / len(rec),
            "mean_value_bits": sum(c.value_bits for c in rec) / len(rec),
            "bits": [f"K{c.key_bits}/V{c.value_bits}" for c in rec],
        }

    def to_dict(self) -> dict:
        return {"model": self.model, "tokens": self.tokens, "base": self.base.to_dict(),
                "layers": [asdict(s) for s in self.layers],
                "recommended": {m: self.summary(m) for m in MODES}}

    def rows(self, mode: str = "balanced") -> list[list[str]]:
        rec = self.recommend(mode)
        return [[str(s.layer), s.kind.replace("_attention", ""), f"{s.key_absmax:.1f}", f"{s.key_outlier_ratio:.1f}",
                 f"{s.value_absmax:.2f}", f"{s.value_outlier_ratio:.1f}",
                 " ".join(f"{100 * s.key_error[b]:.0f}" for b in BITS[:3]),
                 " ".join(f"{100 * s.value_error[b]:.0f}" for b in BITS[:3]), f"K{c.key_bits}/V{c.value_bits}"]
                for s, c in zip(self.layers, rec)]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / x.norm().clamp_min(1e-12)).item()


def _errors(k: torch.Tensor, v: torch.Tensor, base: QuantConfig, rotate_keys: bool, rotate_values: bool):
    d = k.shape[-1]
    n = k.shape[2] // base.key_group * base.key_group
    k, v = k[:, :, :n].float(), v[:, :, :n].float()
    rot = rotation(d)
    kr = k @ rot if rotate_keys else k
    vr = v @ rot if rotate_values else v
    ke, ve = {}, {}
    for b in BITS:
        ke[b] = _rel(kr, dequantize_keys(*quantize_keys(kr, b, base.key_group), b, base.key_group, d))
        vg = base.value_group if b > 2 else min(base.value_group, 16)
        ve[b] = _rel(vr, dequantize_values(*quantize_values(vr, b, vg, clip=base.clip and b <= 2), b, vg, d))
    return ke, ve


@torch.inference_mode()
def calibrate(model, tokenizer, text: str | list[str] | None = None, tokens: int = 512,
              base: QuantConfig | None = None) -> CalibrationReport:
    """One forward pass over ``tokens`` tokens of each calibration text; statistics over all of them.

    ``text``: a string, a list of strings (each prefilled on its own, its keys and values pooled), or ``None``
    for the default mix: ``tokens`` tokens of the calibration part of each text in
    :data:`kvforge.texts.CALIBRATION_MIX` (technical, legal and narrative prose), so the recommendation does
    not follow one style of text. Raises ``ValueError`` when a text has fewer than ``key_group`` tokens.
    """
    from .. import run
    from ..layers import dense_kv
    from ..models import layer_types
    from ..texts import CALIBRATION_MIX, load_text

    base = base or QuantConfig()
    if text is None:
        text = [load_text(name, "calibration") for name in CALIBRATION_MIX]
    pooled: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    count = 0
    for t in [text] if isinstance(text, str) else text:
        ids = run.encode(tokenizer, t)[:, :tokens]
        n = ids.shape[1] // base.key_group * base.key_group
        if n == 0:
            raise ValueError(f"calibration needs at least {base.key_group} tokens per text; one has {ids.shape[1]}")
        cache = run.new_cache(model)
        run.prefill(model, ids.to(run.model_device(model)), cache)
        pooled.append([tuple(x[:, :, :n] for x in dense_kv(layer)) for layer in cache.layers])
        count += ids.shape[1]
    report = None
    for i, kind in enumerate(layer_types(model)):
        k = torch.cat([p[i][0] for p in pooled], dim=2)
        v = torch.cat([p[i][1] for p in pooled], dim=2)
        if report is None:
            base = base.replace(value_group=min(base.value_group, k.shape[-1]))
            report = CalibrationReport(getattr(model, "kvforge_name", model.config.name_or_path), count, base)
        kc = k.float().abs().amax(dim=(0, 2)).flatten()  # per (head, channel)
        vc = v.float().abs().amax(dim=(0, 2)).flatten()
        kmed, vmed = kc.median().clamp_min(1e-12), vc.median().clamp_min(1e-12)
        ke, ve = _errors(k, v, base, base.rotate != "none", base.rotate == "both")
        ke_plain, _ = _errors(k, v, base, False, False)
        report.layers.append(LayerStats(
            i, kind, kc.max().item(), vc.max().item(), (kc.max() / kmed).item(), (vc.max() / vmed).item(),
            (kc > 4 * kmed).nonzero().flatten().tolist(), ke, ve, ke_plain))
    return report
