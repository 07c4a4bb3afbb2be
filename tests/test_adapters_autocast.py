"""A wrapped HF detector trains under CPU bfloat16 autocast: the loss with every route (the
family's own loss plus the routes') is finite and close to the float32 one, and gradients reach
the routes' parameters."""

import pytest
import torch

pytest.importorskip("transformers")

from mrdetr import adapters  # noqa: E402
from mrdetr.adapters import use_fast_deformable_attention  # noqa: E402
from mrdetr.testing.hf_families import tiny_batch, tiny_model  # noqa: E402


@pytest.mark.parametrize("fast", [False, True], ids=["hf-attention", "mrdetr-kernel"])
def test_wrapped_deformable_detr_under_bf16_autocast(fast):
    model = tiny_model("deformable_detr")
    if fast:
        use_fast_deformable_attention(model, backend="pytorch")
    adapters.wrap(model)
    batch = tiny_batch(model)
    fp32 = model(**batch).loss
    with torch.autocast("cpu", torch.bfloat16):
        out = model(**batch)
    assert torch.isfinite(out.loss)
    assert any(k.startswith("aux_instruct/") for k in out.loss_dict)
    torch.testing.assert_close(out.loss.float(), fp32, rtol=0.1, atol=0.1)
    out.loss.backward()
    routes = model.model.decoder.mrdetr_routes
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in routes.parameters())
