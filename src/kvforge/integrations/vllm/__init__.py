"""kvforge's prefix store inside vLLM: a v1 KV connector (extra ``vllm``; ``make vllm-env``).

Public API::

    KVForgeConnector    the connector class vLLM loads (``kv_connector_module_path: kvforge.integrations.vllm``)
    ConnectorConfig     its ``kv_connector_extra_config``: store, cache spec, budget, block, min_tokens, model
    TESTED_VLLM         the vLLM versions it was tested with; others get a warning at start-up

Prompt prefixes computed by one vLLM instance are stored, in any restorable kvforge cache spec
(``dynamic``, ``kvforge-quant:key_bits=8,value_bits=4``), in a kvforge prefix store (memory, directory or Redis) and
loaded into another instance's paged KV cache instead of being prefilled again. Entries are the same as
``kvforge serve``'s: namespaced by the model fingerprint and the cache spec, chained in blocks of 32 tokens
under the request's ``cache_salt``, checksummed, so each finds the other's prefixes. Modelled on LMCache's
vLLM connector (https://github.com/LMCache/LMCache) and vLLM's example connector.
"""

from .config import TESTED_VLLM, ConnectorConfig, check_vllm_version

__all__ = ["TESTED_VLLM", "ConnectorConfig", "KVForgeConnector", "check_vllm_version"]


def __getattr__(name):
    if name == "KVForgeConnector":  # needs vLLM itself; the settings and the paged-layout code do not
        try:
            from .connector import KVForgeConnector
        except ImportError as e:
            raise ImportError(f"kvforge's vLLM connector needs vLLM ({e}); install it in its own environment with "
                              "`make vllm-env` (see the README)") from e
        return KVForgeConnector
    raise AttributeError(f"module 'kvforge.integrations.vllm' has no attribute {name!r}")
