"""``QuantizedKVCache``: a transformers ``Cache`` of quantized layers, built for a model."""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicLayer

from .config import QuantConfig
from .layer import QuantizedLayer


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` of :class:`QuantizedLayer` s; pass it as ``cache=`` (``past_key_values=``).

    Build it with :meth:`for_model` (knows the layer count and which layers slide) or
    :meth:`from_model` (bits picked by a calibration pass). Layers listed in ``protected`` (negative
    indices count from the end) stay in full precision as plain transformers layers.
    """

    def __init__(self, configs: list[QuantConfig | None], layer_types: list[str] | None = None,
                 sliding_window: int | None = None, fused: bool = False):
        from transformers.cache_utils import DynamicSlidingWindowLayer

        layer_types = layer_types or ["full_attention"] * len(configs)
        layers = []
        for cfg, kind in zip(configs, layer_types, strict=True):
            window = sliding_window if kind == "sliding_attention" else None
            if cfg is None:
                layers.append(DynamicSlidingWindowLayer(window) if window else DynamicLayer())
            else:
                layer = QuantizedLayer(cfg, fused=fused, sliding_window=window)
                layer.is_sliding = window is not None
                layers.append(layer)
        super().__init__(layers=layers)
        self.configs = configs
        self.fused = fused

    @classmethod
    def for_model(cls, model, preset: str | None = None, *, protect_first: int = 0, protect_last: int = 0,
                  protected_layers=(), per_layer=None, fused: bool | None = None, **overrides) -> QuantizedKVCache:
        """A cache for ``model``: a preset (default ``safe``) or explicit bits, plus protected layers.

        ``overrides`` are :class:`QuantConfig` fields (``key_bits=3, value_bits=2, key_group=32, ...``; ``None``
        keeps the preset's); an unknown name raises ``ValueError`` listing the known ones. ``per_layer`` (a list of ``QuantConfig`` or ``None``) overrides everything per layer, as
        :func:`kvforge.quant.recommend` produces. ``fused`` (default: on when the model can use
        kvforge's attention) computes attention on the codes instead of dequantizing the past.
        """
        from ..models import layer_types as model_layer_types
        from ..models import text_config
        from .config import resolve_config

        tc = text_config(model)
        n = tc.num_hidden_layers
        types = model_layer_types(model)
        if per_layer is not None:
            if len(per_layer) != n:
                raise ValueError(f"per_layer has {len(per_layer)} entries; the model has {n} layers")
            configs = list(per_layer)
        else:
            cfg = resolve_config(preset, default_preset="safe", **overrides)
            configs = [cfg] * n
        protected = set()
        for i in protected_layers:
            if not -n <= i < n:
                raise ValueError(f"protected layer {i} is out of range for a model with {n} layers")
            protected.add(i % n)
        protected |= set(range(min(protect_first, n))) | set(range(max(n - protect_last, 0), n))
        configs = [None if i in protected else c for i, c in enumerate(configs)]
        latent = getattr(model, "kvforge_mla", None) is not None
        if latent:  # kvforge.mla: the cache holds latents, whose widths each layer checks on its first update
            if fused:
                raise ValueError("fused attention on the codes works on keys and values, not on MLA latents; "
                                 "use fused=off with a converted (latent) model")
            fused = False
        else:
            head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
            # a value group wider than the head is the whole head
            configs = [c.replace(value_group=head_dim) if c is not None and c.value_group > head_dim else c
                       for c in configs]
            for c in configs:
                if c is not None:
                    c.check_head_dim(head_dim)
        if fused is None:
            from .attention import install

            fused = install(model)
        elif fused:
            from .attention import install

            if not install(model):
                raise ValueError("fused attention needs a model whose attention kvforge can replace")
        return cls(configs, types, getattr(tc, "sliding_window", None), fused=fused)

    @classmethod
    def from_model(cls, model, tokenizer, mode: str = "balanced", text: str | list[str] | None = None,
                    **kw) -> QuantizedKVCache:
        """Calibrate on short texts (default: the calibration parts of :data:`kvforge.texts.CALIBRATION_MIX`,
        see :func:`kvforge.quant.calibrate.calibrate`) and build the cache with the recommended per-layer bits."""
        from .calibrate import calibrate

        report = calibrate(model, tokenizer, text=text)
        return cls.for_model(model, per_layer=report.recommend(mode), **kw)

    @property
    def nbytes(self) -> int:
        from ..specs import cache_nbytes

        return cache_nbytes(self)
