"""``KVForgeConnector``: vLLM's v1 KV-connector API over kvforge's prefix store.

Scheduler side: for a new request, :meth:`get_num_new_matched_tokens` looks the prompt up in the store
(blocks of ``block`` tokens chained under the request's ``cache_salt``, entries namespaced by the model
fingerprint and the cache spec, each entry's checksum, model, spec, salt and token ids checked) and offers
vLLM the stored tokens beyond its own prefix-cache hit. :meth:`build_connector_meta` tells the workers
which tokens to load into which blocks, and which whole prompts to store once they are computed.

Worker side: :meth:`start_load_kv` decodes the stored state (dequantizing a quantized spec) and writes the
tokens vLLM did not have into their slots, before the forward pass; :meth:`wait_for_save` reads a
finished prompt's tokens from vLLM's blocks, encodes them with the cache spec and stores them. A load
that fails (an entry evicted or corrupted since the lookup) reports its blocks to vLLM, which recomputes
them. Loading and saving are synchronous.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ...specs import build_cache
from ...state import KVState
from .config import (
    ConnectorConfig,
    check_vllm_version,
    drop_handoff,
    guarded,
    hand_over,
    open_store,
    store_label,
    take_over,
)
from .paged import PagedKV, PagedLayoutError, probe_layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext

log = logging.getLogger("vllm.kvforge")  # under vLLM's logger: its handlers and level
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class Transfer:
    """Load tokens ``start..end`` of ``token_ids`` into the request's blocks, or store ``token_ids[:end]``."""

    req_id: str
    token_ids: list[int]
    start: int
    end: int
    block_ids: list[int]
    salt: str | None


@dataclass
class KVForgeMetadata(KVConnectorMetadata):
    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _Tracked:
    prompt: list[int]
    salt: str | None
    hit: int = 0  # tokens the store offered at the last lookup
    load: int = 0  # tokens vLLM agreed to load (update_state_after_alloc)
    blocks: list[int] = field(default_factory=list)
    stored: bool = False


class KVForgeConnector(KVConnectorBase_V1):
    """Share prompt-prefix KV between vLLM instances and ``kvforge serve``, in a kvforge cache encoding.

    Configure with ``--kv-transfer-config '{"kv_connector": "KVForgeConnector", "kv_connector_module_path":
    "kvforge.integrations.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {"store":
    "redis://127.0.0.1:6379", "cache": "kvforge-quant:key_bits=8,value_bits=4"}}'`` (settings:
    :class:`~kvforge.integrations.vllm.ConnectorConfig`). Raises ``ValueError`` at start-up for an unknown
    setting, a spec whose states cannot be restored, tensor parallelism, or a model with sliding-window
    layers (vLLM creates the connector after loading the weights); a store that cannot be read later is a
    miss with a warning, never a failed request; :class:`~kvforge.integrations.vllm.paged.PagedLayoutError` for a KV cache it cannot read back.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        warning = check_vllm_version(vllm.__version__)
        if warning:
            log.warning(warning)
        self.cfg = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("kvforge connector: tensor_parallel_size > 1 is not supported (each rank holds part of "
                             "the KV heads; entries hold them all)")
        self.block_size = vllm_config.cache_config.block_size
        self.model, self.store = open_store(self.cfg, vllm_config.model_config.model, vllm_config.model_config.dtype)
        tc = self.model.config.get_text_config()
        if any(t != "full_attention" for t in getattr(tc, "layer_types", None) or []):
            raise ValueError("kvforge connector: models with sliding-window layers are not supported yet (vLLM keeps "
                             "every token there, kvforge's states keep the window)")
        self.kv_heads = getattr(tc, "num_key_value_heads", tc.num_attention_heads)
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self._requests: dict[str, _Tracked] = {}  # scheduler side
        self._layers: list[tuple[int, str, torch.Tensor]] = []  # worker side: (model layer, name, paged cache)
        self._paged: PagedKV | None = None
        self._load_errors: set[int] = set()
        self.stats = {"lookups": 0, "hit_tokens": 0, "loaded_tokens": 0, "stored_prefixes": 0, "load_failures": 0}

    # ------------------------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        prompt = list(request.prompt_token_ids or [])
        tracked = self._requests.setdefault(request.request_id, _Tracked(prompt, request.cache_salt))
        self.stats["lookups"] += 1
        # the last prompt token is always computed: its logits start the generation
        hit = guarded("the store lookup", self.store.lookup, prompt, limit=len(prompt) - 1, salt=request.cache_salt)
        tracked.hit = hit.tokens if hit is not None else 0
        if hit is None or hit.tokens <= num_computed_tokens:
            return 0, False
        hand_over(request.request_id, hit.state)
        self.stats["hit_tokens"] += hit.tokens - num_computed_tokens
        return hit.tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        tracked = self._requests.get(request.request_id)
        if tracked is not None:
            tracked.load = num_external_tokens
        if num_external_tokens == 0:
            drop_handoff(request.request_id)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        meta = KVForgeMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is None:  # not seen by get_num_new_matched_tokens
                continue
            tracked.blocks = list(new.block_ids[0])
            self._plan(meta, new.req_id, tracked, new.num_computed_tokens, scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            if tracked is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                tracked.blocks = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                tracked.blocks += new_blocks[0]
            self._plan(meta, req_id, tracked, cached.num_computed_tokens[i], scheduled.get(req_id, 0))
        return meta

    def _plan(self, meta: KVForgeMetadata, req_id: str, tracked: _Tracked, computed: int, scheduled: int) -> None:
        if tracked.load:
            end = computed  # local prefix-cache hit + the tokens vLLM agreed to load
            meta.loads.append(Transfer(req_id, tracked.prompt[:end], end - tracked.load, end, list(tracked.blocks),
                                       tracked.salt))
            tracked.load = 0
        n = len(tracked.prompt) // self.cfg.block * self.cfg.block
        if tracked.stored or computed + scheduled < len(tracked.prompt):
            return
        tracked.stored = True  # once per request
        if n < self.store.min_tokens or n <= tracked.hit:
            return
        if guarded("the store check", self.store.holds, tracked.prompt[:n], tracked.salt) is not False:
            return  # held already, or the store cannot be read
        meta.saves.append(Transfer(req_id, tracked.prompt[:n], 0, n, list(tracked.blocks), tracked.salt))

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        drop_handoff(request.request_id)
        return False, None

    # ------------------------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        layers = []
        for name, cache in kv_caches.items():
            m = _LAYER.search(name)
            if m is None:
                raise ValueError(f"kvforge connector: cannot tell the model layer of vLLM's KV cache {name!r}")
            layers.append((int(m.group(1)), name, cache))
        layers.sort()
        n = self.model.config.get_text_config().num_hidden_layers
        if [i for i, _, _ in layers] != list(range(n)):
            raise ValueError(f"kvforge connector: vLLM's KV caches cover layers {[i for i, _, _ in layers]}, "
                             f"the model has {n}")
        self._layers = layers
        attn = self._vllm_config.compilation_config.static_forward_context[layers[0][1]]
        cache = layers[0][2]

        def write(key, value, scratch, slots):
            try:
                attn.impl.do_kv_cache_update(attn, key, value, scratch, slots)
            except (AttributeError, NotImplementedError) as e:
                raise PagedLayoutError(f"vLLM's {type(attn.impl).__name__} has no separate KV-cache update to "
                                       f"learn its layout from: {e}") from e

        layout = probe_layout(write, tuple(cache.shape), cache.dtype, self.block_size, self.kv_heads, self.head_dim)
        self._paged = PagedKV(layout)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        for load in meta.loads:
            state = take_over(load.req_id)
            if state is None or state.num_tokens < load.end:
                hit = guarded("the store read", self.store.lookup, load.token_ids, limit=load.end, salt=load.salt)
                state = hit.state if hit is not None else None
            if state is None or state.num_tokens < load.end:
                self._fail(load)
                continue
            for (_, _, cache), layer in zip(self._layers, state.layers):
                d = layer.to_dense()
                k, v = d.tensors["keys"][0], d.tensors["values"][0]  # [kv_heads, tokens, head_dim]
                self._paged.write(cache, load.block_ids, load.start, k[:, load.start:load.end],
                                  v[:, load.start:load.end])
            self.stats["loaded_tokens"] += load.end - load.start
            log.info("kvforge connector: loaded %d tokens (%d..%d) of request %s from %s", load.end - load.start,
                     load.start, load.end, load.req_id, store_label(self.cfg.store))

    def _fail(self, load: Transfer) -> None:
        b = self.block_size
        self._load_errors |= set(load.block_ids[load.start // b: (load.end + b - 1) // b])
        self.stats["load_failures"] += 1
        log.warning("kvforge connector: the stored prefix of request %s is gone or unusable; vLLM recomputes it",
                    load.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # whole prompts are stored once every layer is computed (wait_for_save)

    def wait_for_save(self):
        if not self.has_connector_metadata():
            return
        for save in self._get_connector_metadata().saves:
            try:
                self.store.put(self.encode(save), salt=save.salt)
            except Exception as e:  # noqa: BLE001 - a store that is down loses an entry, never a request
                log.warning("kvforge connector: could not store the prefix of request %s: %s", save.req_id, e)
                continue
            self.stats["stored_prefixes"] += 1
            log.info("kvforge connector: stored %d tokens of request %s in %s", save.end, save.req_id,
                     store_label(self.cfg.store))

    def encode(self, save: Transfer) -> KVState:
        """The state of ``save.token_ids`` read from vLLM's blocks, in the connector's cache spec."""
        cache = build_cache(self.cfg.cache, self.model)
        for i, _, paged in self._layers:
            k, v = self._paged.read(paged, save.block_ids, 0, save.end)
            cache.update(k[None], v[None], i)  # a quantized spec quantizes here, as after a prefill
        return KVState.from_cache(cache, self.model, torch.tensor([save.token_ids], dtype=torch.int64))

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors
