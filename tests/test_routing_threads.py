"""Per-pass state belongs to the call: two wrapped models training in two threads at once (as
``nn.DataParallel`` runs its replicas) each get their own route outputs.

Both passes are held inside their first decoder layer until the other one is there too (a
barrier in a forward hook), so the two route passes of one shared integration are in flight at
the same time. The oracle is each model's own single-threaded pass.
"""

import threading

import pytest
import torch
from _adapter_oracle import randomise
from torch import nn

from mrdetr import adapters, routes

ROUTES = routes.mr_detr(num_instruction_tokens=3)


def _run_together(models, calls):
    """``calls[i]()`` in thread ``i``, all inside their first decoder layer at once; returns each
    thread's ``(output, route_outputs)``."""
    barrier = threading.Barrier(len(models), timeout=120)  # a timeout only to never hang

    def meet(*_):
        barrier.wait()  # returns None: the layer's output stays as it is

    hooks = [_first_layer(m).register_forward_hook(meet) for m in models]
    results, errors = [None] * len(models), []

    def work(i):
        try:
            out = calls[i]()
            results[i] = (out, adapters.route_outputs(models[i]))
        except BaseException as e:  # reported in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for h in hooks:
            h.remove()
    if errors:
        raise errors[0]
    return results


def _first_layer(model):
    decoder = next(m for m in model.modules() if "mrdetr_routes" in m._modules)
    return decoder.layers[0]


def _check(results, expected):
    for (out, outs), (want_out, want) in zip(results, expected, strict=True):
        torch.testing.assert_close(outs.hidden_states, want.hidden_states, atol=0, rtol=0)
        for name in ("reference_points", "boxes"):
            a, b = getattr(outs, name), getattr(want, name)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=0, rtol=0)
        yield out, want_out


def test_two_wrapped_torch_decoders_in_two_threads():
    models, calls = [], []
    for seed, q in ((0, 5), (1, 8)):  # different weights and query counts
        torch.manual_seed(seed)
        layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        dec = adapters.wrap(nn.TransformerDecoder(layer, 2), ROUTES)
        randomise(dec, seed=seed)
        g = torch.Generator().manual_seed(seed)
        tgt, mem = torch.randn(2, q, 16, generator=g), torch.randn(2, 6, 16, generator=g)
        models.append(dec)
        calls.append(lambda d=dec, t=tgt, m=mem: d(t, m))
    expected = []
    for model, call in zip(models, calls, strict=True):
        expected.append((call(), adapters.route_outputs(model)))
    results = _run_together(models, calls)
    for out, want in _check(results, expected):
        torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert results[0][1].hidden_states.shape[3] == 5 and results[1][1].hidden_states.shape[3] == 8


def test_two_wrapped_hf_detectors_share_one_integration_in_two_threads():
    pytest.importorskip("transformers")
    from mrdetr.testing.hf_models import hf_deformable_detr, random_detection_batch

    models, calls = [], []
    for seed, q in ((0, 6), (1, 9)):
        model = hf_deformable_detr(with_box_refine=True, num_queries=q, seed=seed)
        adapters.wrap(model, ROUTES)
        randomise(model, seed=seed)
        pixels, _ = random_detection_batch(seed=seed)
        models.append(model)
        calls.append(lambda m=model, p=pixels: m(p))
    expected = []
    for model, call in zip(models, calls, strict=True):
        expected.append((call(), adapters.route_outputs(model)))
    results = _run_together(models, calls)
    for out, want in _check(results, expected):
        torch.testing.assert_close(out.pred_boxes, want.pred_boxes, atol=0, rtol=0)
    assert results[0][1].hidden_states.shape[3] == 6 and results[1][1].hidden_states.shape[3] == 9
