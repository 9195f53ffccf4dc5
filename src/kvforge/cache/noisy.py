"""A deliberately corrupted cache, for checking that metrics notice a damaged past."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..layers import KVStateError


class _AddNoise:
    """New keys/values get Gaussian noise (std relative to the incoming tensor's RMS) before they are stored.

    The tokens of the current forward pass are noised too: a model of a lossy cache, used by tests and
    as a sensitivity probe (``noisy:std=0.1`` is roughly a 10% relative error).
    """

    std: float
    generator: torch.Generator

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().pow(2).mean().sqrt()
        n = torch.randn(x.shape, generator=self.generator).to(x.device) * (self.std * rms)
        return (x.float() + n).to(x.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(self._noise(key_states), self._noise(value_states), *args, **kwargs)

    def load_state(self, state, total_tokens: int) -> None:
        """Refused: the noise of later tokens depends on the random stream of the cache that made the state,
        so a restored noisy cache would not continue as that cache does."""
        raise KVStateError(
            "cannot import a KV state into a 'noisy' cache: it is a diagnostic whose noise stream cannot be "
            "restored; import into 'dynamic' instead"
        )


class NoisyLayer(_AddNoise, DynamicLayer):
    def __init__(self, std: float, generator: torch.Generator):
        super().__init__()
        self.std, self.generator = std, generator


class NoisySlidingLayer(_AddNoise, DynamicSlidingWindowLayer):
    def __init__(self, std: float, generator: torch.Generator, sliding_window: int):
        super().__init__(sliding_window=sliding_window)
        self.std, self.generator = std, generator


def noisy_cache(model, std: float, seed: int = 0) -> DynamicCache:
    """A ``DynamicCache`` for ``model`` whose layers store noised keys and values."""
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache(config=model.config)
    cache.layers = [
        NoisySlidingLayer(std, gen, layer.sliding_window)
        if isinstance(layer, DynamicSlidingWindowLayer)
        else NoisyLayer(std, gen)
        for layer in cache.layers
    ]
    return cache
