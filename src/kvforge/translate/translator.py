"""The translator: per target layer, a linear map to the target's un-rotated keys and values from the aligned
source tokens' un-rotated keys and values (of the mapped source layers) and, in a token-conditioned
translator, from a window of source tokens and the target's own token-local features (see ``.features``).

A token-conditioned translator (``token_rank > 0``) writes the target's exact layer-0 keys and values (they
are token-local) and keeps its layer-0 map as a *probe*: how far the source's features alone miss the exact
layer 0 of a token scores how little the translation can be trusted there, which picks the tokens that
selective recomputation (``.recompute``, ``recompute=`` below) lets the target re-read.

``fit`` (``.fit``) solves the maps in closed form (ridge regression on calibration text, both models frozen);
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
from .align import Alignment, align
from .features import PCA, flat_kv, gather_slot, len_total, token_features, token_local
from .modes import GATE_INIT, MODES, TranslationMode, gated_fuse, get_mode  # noqa: F401 - re-exported

# 2: token-conditioned translators (window of source tokens, token-local target features, exact layer 0);
# a version-1 file (source-only maps) is refused by name: its maps read other features
FORMAT = 2


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
    window: int = 1  # source tokens per target token: the aligned one and window - 1 before it
    window_rank: int = 0  # each older window slot reduced to this many principal components per source layer
    neighbours: int = 0  # previous target tokens whose embeddings join the token-local features
    token_rank: int = 0  # token-local features reduced to this many principal components (0: none)
    extra: dict = field(default_factory=dict)

    @property
    def token_conditioned(self) -> bool:
        return self.token_rank > 0


@dataclass
class Inputs:
    """What :meth:`Translator.project` reads for one text (all computed without gradients)."""

    a: Alignment
    src: dict[int, torch.Tensor]  # source layer -> [Nt, S + (window - 1) * window_rank]
    tok: torch.Tensor | None  # [Nt, token_rank] reduced token-local features
    kv0: tuple[torch.Tensor, torch.Tensor] | None  # the target's exact layer-0 keys/values [H, Nt, D]
    first: list | None  # the target's own first-token keys/values per layer (no special first token)

    def to(self, dtype: torch.dtype) -> Inputs:
        return Inputs(self.a, {j: g.to(dtype) for j, g in self.src.items()},
                      None if self.tok is None else self.tok.to(dtype),
                      None if self.kv0 is None else (self.kv0[0].clone(), self.kv0[1].clone()),
                      None if self.first is None else [(k.clone(), v.clone()) for k, v in self.first])


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
    """Maps a source model's KV state of a text to a target model's (see the module docstring).

    Shapes: source ``[layers_s, kv_heads_s, head_dim_s]``, target ``[layers_t, kv_heads_t, head_dim_t]``
    (``config.source_shape`` / ``target_shape``); one ``Linear`` per target layer."""

    def __init__(self, config: TranslatorConfig):
        super().__init__()
        self.config = config
        _, sh, sd = config.source_shape
        _, th, td = config.target_shape
        per_source = 2 * sh * sd + (config.window - 1) * config.window_rank
        self.maps = torch.nn.ModuleList(
            torch.nn.Linear(len(src) * (2 * sh * sd if i == 0 and config.token_conditioned else per_source)
                            + (config.token_rank if i > 0 else 0), th * td * 2)
            for i, src in enumerate(config.layers))
        # the target's own keys/values of its first special token (e.g. <bos>) at position 0, per layer
        self.register_buffer("bos_k", torch.zeros(len(config.layers), th, td))
        self.register_buffer("bos_v", torch.zeros(len(config.layers), th, td))
        if config.window > 1 and config.window_rank:
            self.window_pca = torch.nn.ModuleDict(
                {str(j): PCA(2 * sh * sd, config.window_rank) for j in sorted({j for ls in config.layers for j in ls})})
        if config.token_conditioned:
            self.token_pca = PCA(token_dim(config), config.token_rank)
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
    def source_features(self, src: dict[int, tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor
                        ) -> dict[int, torch.Tensor]:
        """Per source layer, ``[Nt, S + (window - 1) * window_rank]``: the aligned token's keys and values, then
        each older window slot reduced by that layer's principal components."""
        total = len_total(src)
        out = {}
        for j, (k, v) in src.items():
            flat = flat_kv(k, v)
            parts = [gather_slot(flat, index, 0, total, j)]
            if self.config.window > 1 and self.config.window_rank:  # reduce each source token once, then gather
                red = self.window_pca[str(j)](flat)
                parts += [gather_slot(red, index, s, total, j) for s in range(1, self.config.window)]
            out[j] = torch.cat(parts, 1)
        return out

    def features(self, inputs: Inputs, layer: int) -> torch.Tensor:
        """``[Nt, F]`` features of target ``layer``: its source layers' features, then (token-conditioned, layers
        after 0) the reduced token-local features. Layer 0 of a token-conditioned translator (the probe) reads
        only the aligned source tokens."""
        _, sh, sd = self.config.source_shape
        if layer == 0 and self.config.token_conditioned:
            return torch.cat([inputs.src[j][:, : 2 * sh * sd] for j in self.config.layers[0]], dim=1)
        parts = [inputs.src[j] for j in self.config.layers[layer]]
        if self.config.token_conditioned:
            parts.append(inputs.tok)
        return torch.cat(parts, dim=1)

    def prepare(self, state: KVState, text: str, source_model, target_model, source_tokenizer,
                target_tokenizer) -> Inputs:
        """Alignment, source features, the target's token-local features and (when the target has no special
        first token) its own first-token keys/values: everything :meth:`project` needs, without gradients."""
        from .evaluate import prefill_state

        self.check_pair(source_model, target_model)
        a = align(text, source_tokenizer, target_tokenizer)
        if state.token_ids.shape[1] != len(a.source_ids) or not torch.equal(state.token_ids[0].cpu(), a.source_ids):
            raise KVStateError("the source state does not hold the tokens of this text (tokenize it with the source "
                               "tokenizer, special tokens included)")
        with torch.no_grad():
            src = unrotated(state, source_model, sorted({j for ls in self.config.layers for j in ls}))
            feats = self.source_features(src, a.index)
            tok = kv0 = None
            if self.config.token_conditioned:
                emb, k0, v0 = token_local(target_model, a.target_ids)
                kv0 = (k0.cpu(), v0.cpu())
                tok = self.token_pca(token_features(emb, k0, v0, self.config.neighbours).to(self.token_pca.mean.device))
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
        return Inputs(a, feats, tok, kv0, first)

    def _map(self, inputs: Inputs, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lin = self.maps[i]
        n_t, (_, th, td) = len(inputs.a.target_ids), self.config.target_shape
        y = lin(self.features(inputs, i).to(lin.weight))  # [Nt, 2*th*td]
        k, v = y.view(n_t, 2, th, td).permute(1, 2, 0, 3)  # [th, Nt, td] each
        return k, v

    def project(self, inputs: Inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per target layer, the un-rotated keys and values ``[heads, Nt, head_dim]`` (differentiable in the
        maps' weights)."""
        a, first = inputs.a, inputs.first
        n_t = len(a.target_ids)
        device = self.bos_k.device
        special = (a.index < 0)[None, :, None].to(device)
        head = torch.zeros(n_t, dtype=torch.bool, device=device)
        head[0] = first is not None
        out = []
        for i in range(len(self.maps)):
            if i == 0 and inputs.kv0 is not None:  # exact: layer 0 is token-local
                k, v = (t.to(device) for t in inputs.kv0)
            else:
                k, v = self._map(inputs, i)
            k = torch.where(special, self.bos_k[i][:, None], k)
            v = torch.where(special, self.bos_v[i][:, None], v)
            if first is not None:
                k = torch.where(head[None, :, None], first[i][0][:, None].to(k.dtype), k)
                v = torch.where(head[None, :, None], first[i][1][:, None].to(v.dtype), v)
            out.append((k, v))
        return out

    @torch.no_grad()
    def trust_scores(self, inputs: Inputs) -> torch.Tensor:
        """``[Nt]`` how badly the source's features alone miss each target token's exact layer-0 keys and
        values (relative squared error of the layer-0 probe; higher = trust the translation less). Special
        tokens and a computed first token score -inf (they are exact). Needs a token-conditioned translator."""
        if inputs.kv0 is None:
            raise ValueError("trust scores need a token-conditioned translator (token_rank > 0)")
        k, v = self._map(inputs, 0)
        k0, v0 = (t.to(k) for t in inputs.kv0)
        err = ((k - k0) ** 2).sum((0, 2)) + ((v - v0) ** 2).sum((0, 2))
        score = err / ((k0 ** 2).sum((0, 2)) + (v0 ** 2).sum((0, 2))).clamp_min(1e-6)
        score = score.cpu().masked_fill(inputs.a.index < 0, float("-inf"))
        if inputs.first is not None:
            score[0] = float("-inf")
        return score

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
                  target_tokenizer, own: KVState | None = None, recompute: float = 0.0,
                  select: str = "sentence", own_prefix: KVState | None = None) -> KVState:
        """The target's KV state for ``text``, from the source's ``state`` of the same text.

        A ``fuse`` translator mixes the result into ``own``, the target's own state of the same text
        (required in that mode): ``own + gate * (translated - own)`` per layer and head.

        ``recompute`` (0 to 1): after translation the target re-reads that share of the text's tokens,
        attending to the translated cache, and writes its own keys/values over theirs (CacheBlend's repair;
        see :func:`~kvforge.translate.recompute.recompute`). ``select`` picks them: ``trust`` (the tokens the
        layer-0 probe trusts least; token-conditioned translators), ``sentence`` (the default: whole sentences,
        the least trusted on average first, which keeps a fact's clause together; on passage QA it beat
        ``trust`` behind an own prefix in both directions, ``benchmarks/translate_select.py``) or ``last``.

        ``own_prefix``: the target's own state of the text's first tokens (a shared instruction or few-shot
        block it has cached, as prefix caching keeps a system prompt; cut it at a token boundary of the whole
        text with :func:`~kvforge.translate.align.prefix_tokens`). Those tokens keep the target's own keys and
        values and are never recomputed; the rest is translated (and repaired). Raises
        :class:`~kvforge.state.KVStateError` for a prefix that is not the text's opening in the target's tokens."""
        if self.config.identity:
            self.check_pair(source_model, target_model)
            return state
        if not 0.0 <= recompute <= 1.0:
            raise ValueError(f"recompute is a share of the tokens, 0 to 1; got {recompute}")
        mode = self.mode
        if mode.needs_own and own is None:
            raise ValueError(f"a {mode.name}-mode translator needs the target's own state of the text (own=...)")
        if recompute and mode.needs_own:
            raise ValueError("recompute repairs a replace-mode translation; a fuse translator already has the "
                             "target's own state")
        if recompute:
            from .recompute import SELECT
            if select not in SELECT:
                raise ValueError(f"unknown recompute selection {select!r}; choose from {', '.join(SELECT)}")
            if select != "last" and not self.config.token_conditioned:
                raise ValueError(f"recompute selection {select!r} needs a token-conditioned translator (token_rank > 0)")
        if own_prefix is not None and mode.needs_own:
            raise ValueError("own_prefix is for a replace-mode translation; a fuse translator has the target's own "
                             "state of the whole text")
        inputs, out = self._translated(state, text, source_model, target_model, source_tokenizer, target_tokenizer)
        start = 0
        if own_prefix is not None:
            from .recompute import splice_prefix

            out, start = splice_prefix(out, own_prefix), own_prefix.num_tokens
        if recompute:
            from .recompute import by_sentence, choose, sentence_ids
            from .recompute import recompute as redo

            scores = self.trust_scores(inputs) if select != "last" else None
            if select == "sentence":
                scores = by_sentence(scores, sentence_ids(target_tokenizer, text))
            out = redo(target_model, out, choose(inputs.a.index, recompute, select, scores, start=start))
        return mode.combine(self, own, out)

    def translated(self, state: KVState, text: str, source_model, target_model, source_tokenizer,
                   target_tokenizer) -> KVState:
        """The projected source state in the target's layout, before any fusion (what ``replace`` uses)."""
        return self._translated(state, text, source_model, target_model, source_tokenizer, target_tokenizer)[1]

    @torch.no_grad()
    def _translated(self, state: KVState, text: str, source_model, target_model, source_tokenizer,
                    target_tokenizer) -> tuple[Inputs, KVState]:
        """:meth:`prepare`'s inputs and the projected state built from them."""
        inputs = self.prepare(state, text, source_model, target_model, source_tokenizer, target_tokenizer)
        return inputs, self.build_state(self.project(inputs), inputs.a, target_model)

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
        if info["format"] < FORMAT:
            raise ArtifactError(f"{path}: a kvforge translator in format version {info['format']} (source-only maps); "
                                f"this kvforge reads version {FORMAT} (token-conditioned maps): fit and train it "
                                "again with `kvforge translate fit` / `kvforge translate train`")
        t = cls(TranslatorConfig(**info["config"]))
        t.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return t


def token_dim(config: TranslatorConfig) -> int:
    """Width of the raw token-local features: embeddings of the token and its neighbours, layer-0 keys and
    values (the target's hidden size is stored in ``config.extra["target_hidden"]``)."""
    _, th, td = config.target_shape
    return (config.neighbours + 1) * int(config.extra["target_hidden"]) + 2 * th * td


def identity(model, name: str = "") -> Translator:
    """The same-model translator: a state passes through unchanged."""
    from ..models import fingerprint

    shape = _model_shape(model)
    fp = fingerprint(model)
    cfg = TranslatorConfig(name, name, fp, fp, shape, shape, [[i] for i in range(shape[0])], identity=True)
    return Translator(cfg)
