"""Saving and loading converted (latent-attention) models: safetensors weights, the base model's config,
and ``kvforge_mla.json`` recording the conversion and the base model's fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifacts import ArtifactError, check_version
from ..models import register_loader
from .convert import MLAConfig, install

MLA_FILE = "kvforge_mla.json"
FORMAT = 1


def save_converted(model, tokenizer, directory: str | Path) -> Path:
    """Write a converted model so that ``kvforge.load_model(directory)`` loads it back with identical logits."""
    from safetensors.torch import save_file

    cfg: MLAConfig | None = getattr(model, "kvforge_mla", None)
    if cfg is None:
        raise ValueError("this model is not converted to latent attention (kvforge.mla.convert first)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / MLA_FILE).write_text(json.dumps({"format": FORMAT, "config": cfg.to_dict()}, indent=1))
    return out


def read_config(directory: str | Path) -> MLAConfig:
    path = Path(directory) / MLA_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not a readable kvforge MLA config ({e})") from e
    check_version(info.get("format", 0), FORMAT, str(path), "kvforge MLA conversion")
    return MLAConfig(**info["config"])


def load_converted(directory: str | Path, dtype: torch.dtype = torch.float32):
    """The converted model saved in ``directory`` (base architecture from its config, latent attention from
    ``kvforge_mla.json``, weights from ``model.safetensors``); every weight must be present."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    cfg = read_config(directory)
    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    install(model, cfg)
    weights = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)
               and "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match the recorded conversion "
                         f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()


register_loader(MLA_FILE, load_converted)
