"""The translator: per target layer, a linear map from the aligned source tokens' un-rotated keys and
values (of the mapped source layers) to the target's un-rotated keys and values.

``fit`` solves it in closed form (ridge regression on calibration text, both models frozen);
``translate`` turns a source ``KVState`` into a target ``KVState`` that the target continues from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..artifacts import ArtifactError, check_version
from ..rope import apply_rope, cos_sin, remove_rope
from ..state import KVState, KVStateError, LayerState
from .align import align
from .layers import layer_map
from .modes import GATE_INIT, MODES, TranslationMode, gated_fuse, get_mode  # noqa: F401 - re-exported

FORMAT = 1


class TranslatorMismatchError(ValueError):
    """A translator used with models other than the pair it was fitted for."""


@dataclass
class TranslatorConfig:
    source: str
    target: str
    source_fingerprint: str
    target_fingerprint: str
    source_shape: list[int]  # layers, kv heads, head_dim
    target_shape: list[int]
    layers: list[list[int]]  # source layers feeding each target layer
    strategy: str = "nearest"
    k: int = 3
    ridge: float = 1e-2
    tokens_fitted: int = 0
    identity: bool = False
    sliding_sources: bool = False
    mode: str = "replace"  # a registered TranslationMode's name (see .modes): replace or fuse
    trained_steps: int = 0
    extra: dict = field(default_factory=dict)


def _model_shape(model) -> list[int]:
    from ..models import text_config

    tc = text_config(model)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return [tc.num_hidden_layers, tc.num_key_value_heads, head_dim]


def unrotated(state: KVState, model, layers: list[int] | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Keys with RoPE removed (model's own rotary embedding, per layer type) and values, per layer index,
    for the tokens each layer holds (``[B, H, n, D]``)."""
    out, rope = {}, {}
    wanted = range(len(state.layers)) if layers is None else layers
    for i in wanted:
        layer = state.layers[i].to_dense()
        k, v = layer.tensors["keys"], layer.tensors["values"]
        key = (state.layer_types[i], k.shape[2])  # one rotary evaluation per layer type and length
        if key not in rope:
            rope[key] = cos_sin(model, state.positions[-k.shape[2]:], state.layer_types[i])
        out[i] = (remove_rope(k.float(), *rope[key]), v.float())
    return out


class Translator(torch.nn.Module):
    def __init__(self, config: TranslatorConfig):
        super().__init__()
        self.config = config
        _, sh, sd = config.source_shape
        _, th, td = config.target_shape
        self.maps = torch.nn.ModuleList(
            torch.nn.Linear(len(src) * sh * sd * 2, th * td * 2) for src in config.layers)
        # the target's own keys/values of its first special token (e.g. <bos>) at position 0, per layer
        self.register_buffer("bos_k", torch.zeros(len(config.layers), th, td))
        self.register_buffer("bos_v", torch.zeros(len(config.layers), th, td))
        self._first_kv: dict[int, list] = {}  # target token id -> its own first-position keys/values per layer
        for name, param in get_mode(config.mode).extra_parameters(len(config.layers), th).items():
            setattr(self, name, param)  # e.g. fuse mode's gate

    @property
    def mode(self) -> TranslationMode:
        """The :class:`~kvforge.translate.modes.TranslationMode` named by ``config.mode``."""
        return get_mode(self.config.mode)

    # -- checks --------------------------------------------------------------------------------
    def check_pair(self, source_model, target_model) -> None:
        from ..models import fingerprint

        got = (fingerprint(source_model), fingerprint(target_model))
        want = (self.config.source_fingerprint, self.config.target_fingerprint)
        if got != want:
            raise TranslatorMismatchError(
                f"this translator was fitted for {self.config.source} -> {self.config.target} "
                f"(fingerprints {want[0]} -> {want[1]}); the models given have fingerprints {got[0]} -> {got[1]}")

    # -- features ------------------------------------------------------------------------------
    @staticmethod
    def gather(src: dict[int, tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per source layer, ``[Nt, 2 * heads * head_dim]``: keys then values of the source token aligned
        with each target token (batch 1)."""
        out = {}
        total = len_total(src)
        idx = index.clamp_min(0)
        for j, (k, v) in src.items():
            n = k.shape[2]
            off = idx - (total - n)  # sliding source layers hold only their last n tokens
            if (off[index >= 0] < 0).any():
                raise KVStateError(f"source layer {j} holds only its last {n} tokens; the alignment needs older ones")
            off = off.clamp(0, n - 1)
            kv = torch.stack([k[0][:, off], v[0][:, off]])  # [2, H, Nt, D]
            out[j] = kv.permute(2, 0, 1, 3).reshape(len(index), -1)
        return out

    def features(self, gathered: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        """``[Nt, F]`` features of target ``layer``: its source layers' gathered keys and values."""
        return torch.cat([gathered[j] for j in self.config.layers[layer]], dim=1)

    def prepare(self, state: KVState, text: str, source_model, target_model, source_tokenizer, target_tokenizer):
        """Alignment, gathered source features and (when the target has no special first token) the
        target's own first-token keys/values: everything :meth:`project` needs, computed without gradients."""
        from .evaluate import prefill_state

        self.check_pair(source_model, target_model)
        a = align(text, source_tokenizer, target_tokenizer)
        if state.token_ids.shape[1] != len(a.source_ids) or not torch.equal(state.token_ids[0].cpu(), a.source_ids):
            raise KVStateError("the source state does not hold the tokens of this text (tokenize it with the source "
                               "tokenizer, special tokens included)")
        with torch.no_grad():
            src = unrotated(state, source_model, sorted({j for ls in self.config.layers for j in ls}))
            gathered = self.gather(src, a.index)
            first = None
            if a.index[0] >= 0:
                # no special first token: the target's first token is its attention sink, whose keys and values
                # are outliers no linear map reproduces; the target computes that one token itself. They depend
                # on nothing but the token, so they are remembered per token id.
                tid = int(a.target_ids[0])
                first = self._first_kv.get(tid)
                if first is None:
                    own = unrotated(prefill_state(target_model, a.target_ids[:1]), target_model)
                    first = [(k[0, :, 0].clone(), v[0, :, 0].clone()) for k, v in (own[i] for i in range(len(self.maps)))]
                    if len(self._first_kv) >= 4096:
                        self._first_kv.pop(next(iter(self._first_kv)))
                    self._first_kv[tid] = first
        return a, gathered, first

    def project(self, a, gathered: dict[int, torch.Tensor], first) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per target layer, the un-rotated keys and values ``[heads, Nt, head_dim]`` (differentiable in the
        maps' weights)."""
        n_t, (_, th, td) = len(a.target_ids), self.config.target_shape
        device = self.bos_k.device
        special = (a.index < 0)[None, :, None].to(device)
        head = torch.zeros(n_t, dtype=torch.bool, device=device)
        head[0] = first is not None
        out = []
        for i, lin in enumerate(self.maps):
            y = lin(self.features(gathered, i).to(lin.weight))  # [Nt, 2*th*td]
            k, v = y.view(n_t, 2, th, td).permute(1, 2, 0, 3)  # [th, Nt, td] each
            k = torch.where(special, self.bos_k[i][:, None], k)
            v = torch.where(special, self.bos_v[i][:, None], v)
            if first is not None:
                k = torch.where(head[None, :, None], first[i][0][:, None].to(k.dtype), k)
                v = torch.where(head[None, :, None], first[i][1][:, None].to(v.dtype), v)
            out.append((k, v))
        return out

    def build_state(self, kv: list[tuple[torch.Tensor, torch.Tensor]], a, target_model) -> KVState:
        """The target's KV state from :meth:`project`'s output: keys rotated at the target's positions."""
        from ..models import fingerprint, layer_types, text_config

        types = layer_types(target_model)
        positions = torch.arange(len(a.target_ids))
        dtype = next(target_model.parameters()).dtype
        out, rope = [], {}
        for i, (k, v) in enumerate(kv):
            if types[i] not in rope:
                rope[types[i]] = cos_sin(target_model, positions, types[i])
            out.append(LayerState.dense(apply_rope(k[None], *rope[types[i]]).to(dtype), v[None].to(dtype).contiguous()))
        tc = text_config(target_model)
        return KVState(out, a.target_ids[None], positions, list(types), fingerprint(target_model),
                       model_name=self.config.target, sliding_window=getattr(tc, "sliding_window", None),
                       num_model_layers=len(out), meta={"translated_from": self.config.source})

    def translate(self, state: KVState, text: str, source_model, target_model, source_tokenizer,
                  target_tokenizer, own: KVState | None = None) -> KVState:
        """The target's KV state for ``text``, from the source's ``state`` of the same text.

        A ``fuse`` translator mixes the result into ``own``, the target's own state of the same text
        (required in that mode): ``own + gate * (translated - own)`` per layer and head."""
        if self.config.identity:
            self.check_pair(source_model, target_model)
            return state
        mode = self.mode
        if mode.needs_own and own is None:
            raise ValueError(f"a {mode.name}-mode translator needs the target's own state of the text (own=...)")
        out = self.translated(state, text, source_model, target_model, source_tokenizer, target_tokenizer)
        return mode.combine(self, own, out)

    @torch.no_grad()
    def translated(self, state: KVState, text: str, source_model, target_model, source_tokenizer,
                   target_tokenizer) -> KVState:
        """The projected source state in the target's layout, before any fusion (what ``replace`` uses)."""
        a, gathered, first = self.prepare(state, text, source_model, target_model, source_tokenizer,
                                          target_tokenizer)
        return self.build_state(self.project(a, gathered, first), a, target_model)

    def fuse(self, own: KVState, translated: KVState) -> KVState:
        """``own + sigmoid(gate) * (translated - own)`` per layer, for keys and values, per target head (both
        states rotated at the same positions, so mixing the rotated tensors is exact): a fuse-mode
        translator's gated mix (see :class:`~kvforge.translate.modes.Fuse`)."""
        return gated_fuse(self.gate, own, translated, self.config.source)

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        """One safetensors file: the maps (``dtype``; float16 halves a shipped file) and a JSON of the
        settings and both models' fingerprints."""
        meta = {"kvforge-translator": json.dumps({"format": FORMAT, "config": asdict(self.config)})}
        save_file({k: v.to(dtype).contiguous() for k, v in self.state_dict().items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Translator:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
            raise ArtifactError(f"{path}: not a readable translator file ({e})") from e
        if "kvforge-translator" not in meta:
            raise ArtifactError(f"{path}: not a kvforge translator (no 'kvforge-translator' metadata)")
        info = json.loads(meta["kvforge-translator"])
        check_version(info.get("format"), FORMAT, str(path), "kvforge translator")
        t = cls(TranslatorConfig(**info["config"]))
        t.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return t


def len_total(src: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Tokens of the longest (full-attention) source layer: the whole text."""
    return max(k.shape[2] for k, _ in src.values())


def identity(model, name: str = "") -> Translator:
    """The same-model translator: a state passes through unchanged."""
    from ..models import fingerprint

    shape = _model_shape(model)
    fp = fingerprint(model)
    cfg = TranslatorConfig(name, name, fp, fp, shape, shape, [[i] for i in range(shape[0])], identity=True)
    return Translator(cfg)


@torch.no_grad()
def fit(source_model, target_model, source_tokenizer, target_tokenizer, texts: list[str], strategy: str = "nearest",
        k: int = 3, ridge: float = 1e-2, source_name: str = "", target_name: str = "",
        sliding_sources: bool = False, show_progress: bool = True) -> Translator:
    """Closed-form ridge fit of every target layer's map on ``texts`` (both models frozen).

    ``sliding_sources``: let the source's sliding-window layers feed the map too; such a translator only
    translates contexts that fit in the source's window (a longer one raises ``KVStateError``).
    """
    from ..models import fingerprint, layer_types
    from ..progress import progress
    from .evaluate import prefill_state

    s_shape, t_shape = _model_shape(source_model), _model_shape(target_model)
    # a sliding-window source layer forgets tokens older than its window, so by default only the source's
    # full-attention layers feed the map: then any context length translates
    usable = [i for i, t in enumerate(layer_types(source_model)) if sliding_sources or t != "sliding_attention"]
    layers = [[usable[j] for j in js] for js in layer_map(len(usable), t_shape[0], strategy, k)]
    cfg = TranslatorConfig(source_name, target_name, fingerprint(source_model), fingerprint(target_model), s_shape,
                           t_shape, layers, strategy, k, ridge, sliding_sources=sliding_sources)
    tr = Translator(cfg)
    xtx = [None] * t_shape[0]
    xty = [None] * t_shape[0]
    tokens = 0
    for text in progress(texts, desc="fit translator", disable=not show_progress):
        a = align(text, source_tokenizer, target_tokenizer)
        s_state, t_state = prefill_state(source_model, a.source_ids), prefill_state(target_model, a.target_ids)
        src = unrotated(s_state, source_model, sorted({j for ls in layers for j in ls}))
        tgt = unrotated(t_state, target_model)
        keep = a.index >= 0
        keep[0] = False  # position 0 is the target's attention sink: it is never translated (see translate)
        n_t = len(a.target_ids)
        gathered = tr.gather(src, a.index)
        for i in range(t_shape[0]):
            x = tr.features(gathered, i)[keep]
            x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
            tk, tv = tgt[i]
            held = tk.shape[2]  # a sliding target layer holds only its last tokens
            rows = torch.arange(n_t)[keep]
            sel = rows >= n_t - held
            y = torch.cat([tk[0].permute(1, 0, 2).reshape(held, -1), tv[0].permute(1, 0, 2).reshape(held, -1)], 1)
            y = y[rows[sel] - (n_t - held)].double()
            x = x[sel]
            xtx[i] = x.T @ x if xtx[i] is None else xtx[i] + x.T @ x
            xty[i] = x.T @ y if xty[i] is None else xty[i] + x.T @ y
            if a.index[0] < 0 and held == n_t:  # the target's own first special token, e.g. <bos>
                tr.bos_k[i], tr.bos_v[i] = tk[0][:, 0], tv[0][:, 0]
        tokens += int(keep.sum())
    for i, lin in enumerate(tr.maps):
        a_ = xtx[i]
        f = a_.shape[0] - 1
        reg = ridge * torch.trace(a_[:f, :f]) / f
        w = torch.linalg.solve(a_ + reg * torch.diag(torch.cat([torch.ones(f), torch.zeros(1)]).double()), xty[i])
        lin.weight.copy_(w[:f].T.float())
        lin.bias.copy_(w[f].float())
    tr.config.tokens_fitted = tokens
    return tr
