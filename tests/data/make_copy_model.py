"""Re-create ``copy_llama.safetensors``: the tiny test Llama trained to copy repeated random words.

A random-weight model predicts almost uniformly whatever its cache holds, so no corruption of its cache
can make it measurably worse. This one needs its past to predict the second copy of each word, which is
what the evaluation tests need. Run: ``.venv/bin/python tests/data/make_copy_model.py`` (about 1-2 min).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))


def copy_text(seed: int = 0, n: int = 400) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(n)]
    return " ".join(w + " " + w for w in words)


def main(steps: int = 300) -> None:
    from conftest import TINY, CharTokenizer

    model, tok = TINY["llama"](), CharTokenizer()
    ids = tok(copy_text(), return_tensors="pt").input_ids
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    torch.manual_seed(0)
    for step in range(steps):
        starts = torch.randint(0, ids.shape[1] - 64, (8,))
        batch = torch.stack([ids[0, i : i + 64] for i in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(step, round(loss.item(), 3))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(HERE / "copy_llama.safetensors"))


if __name__ == "__main__":
    main()
