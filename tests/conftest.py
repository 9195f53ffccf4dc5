"""Shared fixtures: tiny random-weight models (fast) and the bundled real models (integration)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("KVFORGE_QUIET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class CharTokenizer:
    """A minimal tokenizer for tiny models: one token per byte, BOS=1, EOS=2."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    eos_token, pad_token = "<eos>", "<pad>"
    chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant:{% endif %}")

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False, **kwargs):
        import jinja2

        text = jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)
        return self(text).input_ids if tokenize else text

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [3 + b for b in text.encode()]
        ids = [i % 256 for i in ids]

        class Enc(dict):
            pass

        enc = Enc(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)
        enc.input_ids = enc["input_ids"]
        return enc

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return bytes((i - 3) % 256 for i in ids if i > 2).decode("utf-8", "replace")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _gemma():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=512, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval()


TINY = {"llama": _llama, "gemma": _gemma}


@pytest.fixture(scope="session", params=list(TINY))
def tiny(request):
    """``(model, tokenizer)`` for each tiny architecture (GQA Llama; MQA Gemma 3 with sliding layers)."""
    model = TINY[request.param]()
    model.kvforge_name = f"tiny-{request.param}"
    return model, CharTokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    m = _llama()
    m.kvforge_name = "tiny-llama"
    return m, CharTokenizer()


@pytest.fixture(scope="session")
def tiny_gemma():
    m = _gemma()
    m.kvforge_name = "tiny-gemma"
    return m, CharTokenizer()


_REAL: dict = {}


def real_model(name):
    if name not in _REAL:
        from kvforge import load_model

        _REAL[name] = load_model(name)
    return _REAL[name]


@pytest.fixture(scope="session", params=["smollm2-135m", "gemma3-270m"])
def bundled(request):
    return real_model(request.param)


@pytest.fixture(scope="session")
def smollm():
    return real_model("smollm2-135m")


@pytest.fixture(scope="session")
def real_gemma():
    return real_model("gemma3-270m")
