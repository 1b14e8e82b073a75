"""On a CUDA GPU: the model's auto backend (fused for bias encodings, sdpa otherwise) agrees
with the reference backend, in training and in KV-cache decoding."""
from __future__ import annotations

import pytest
import torch
from model_testlib import tiny_config

from megafire.model import GPT, KVCache

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", ["fire", "alibi", "kerple_log", "t5", "rope", "nope"])
def test_auto_backend_matches_reference_on_cuda(parallel, name):
    cfg = tiny_config(name, {"init_L": 16.0} if name == "fire" else None, hidden_size=128, num_heads=4)
    models = {}
    for backend in ("auto", "reference"):
        cfg.attention.backend = backend
        models[backend] = GPT.from_config(cfg, parallel, seed=0).cuda()
    x = torch.randint(0, 64, (2, 96), device="cuda")
    pos = torch.arange(96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = {b: m(x, pos).float() for b, m in models.items()}
    torch.testing.assert_close(out["auto"], out["reference"], atol=5e-2, rtol=5e-2)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cache = KVCache(len(models["auto"].blocks))
        steps = [models["auto"](x[:, :64], pos[:64], cache=cache)]
        steps += [models["auto"](x[:, t:t + 1], pos[t:t + 1], cache=cache) for t in range(64, 96)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), out["reference"], atol=5e-2, rtol=5e-2)
