"""kvforge inside other engines: :mod:`kvforge.integrations.vllm` (a vLLM v1 KV connector)."""
