"""Each newer family through the real server: the engine's batching and both RPCs; greedy output is
`generate()` on the whole model (the slice-level tier, tests/test_slices_parity.py, covers every split).

Qwen3.5, the hybrid (recurrent state per sequence in its linear-attention layers, the published multimodal
layout), is served from Ray slice actors; what crosses between actors is hidden states, the same for every
family, so Qwen3 and Qwen3-MoE are served from in-process slices."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from qwen_relay.client import RelayClient
from qwen_relay.server.app import ServeOptions

MAX_NEW = 16
PROMPTS = [[5, 17, 300, 42, 7, 999, 3], [11, 12], [400, 401, 402, 403, 404, 405, 406, 407, 408], [77]]
CASES = [
    pytest.param("qwen3_model", "0-1,2-4", False, id="qwen3"),
    pytest.param("qwen3_moe_model", "0-2,3-4", False, id="qwen3_moe"),
    pytest.param("qwen3_5_model", "0-1,2-5,6-7", True, id="qwen3_5-ray", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("model_fixture", "layers", "use_ray"), CASES)
def test_family_served(request, relay_factory, reference, model_fixture, layers, use_ray):
    model_dir = request.getfixturevalue(model_fixture)
    relay = relay_factory(ServeOptions(model=str(model_dir), layers=layers, max_context=256, use_ray=use_ray))
    with RelayClient(f"127.0.0.1:{relay.port}", timeout=120) as client:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # in flight together: one batch
            results = list(pool.map(lambda ids: client.generate(prompt_token_ids=ids, max_new_tokens=MAX_NEW),
                                    PROMPTS))
        expected = [reference(model_dir, ids, MAX_NEW) for ids in PROMPTS]
        assert [r.token_ids for r in results] == expected
        streamed = [t for chunk in client.stream(prompt_token_ids=PROMPTS[0], max_new_tokens=MAX_NEW)
                    for t in chunk.token_ids]
        assert streamed == expected[0]
