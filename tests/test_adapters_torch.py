"""mrdetr.adapters on torch nn.TransformerDecoder: eval is the original, packed routes equal an
unpacked per-route oracle, gradients stay on their routes, unwrap restores the checkpoint."""

import copy
import io
import pickle

import pytest
import torch
from _adapter_oracle import layer_outputs, randomise, route_copy
from torch import nn

from mrdetr import adapters, routes
from mrdetr.adapters import TorchDecoderIntegration

C, HEADS, FFN, Q, S, B = 32, 4, 48, 6, 9, 2
LAYOUTS = [(bf, nf) for bf in (True, False) for nf in (False, True)]
IDS = [f"{'bf' if bf else 'sf'}-{'prenorm' if nf else 'postnorm'}" for bf, nf in LAYOUTS]
ROUTE_SETS = {
    "mr_detr": routes.mr_detr(num_instruction_tokens=3),
    "row10": routes.paper_ablation(10),  # own self-attention + own FFN routes
    "mixed": (
        routes.Route("primary"),
        routes.Route("aux_sa_tok", supervision="o2m", own_self_attn=True, num_instruction_tokens=2),
        routes.Route("aux_plain", supervision="o2m"),
        routes.Route("aux_ffn", supervision="o2m", own_ffn=True),
    ),
}


def make_decoder(batch_first=True, norm_first=False, dropout=0.0, layers=2, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerDecoderLayer(
        C, HEADS, FFN, dropout=dropout, batch_first=batch_first, norm_first=norm_first
    )
    return nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(C))


def make_inputs(batch_first=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    tgt, mem = torch.randn(B, Q, C, generator=g), torch.randn(B, S, C, generator=g)
    mask = torch.rand(Q, Q, generator=g) > 0.7
    mask.fill_diagonal_(False)
    kpm = torch.zeros(B, Q, dtype=torch.bool)
    kpm[1, -2:] = True
    mem_kpm = torch.zeros(B, S, dtype=torch.bool)
    mem_kpm[0, -3:] = True
    if not batch_first:
        tgt, mem = tgt.transpose(0, 1), mem.transpose(0, 1)
    kw = dict(tgt_mask=mask, tgt_key_padding_mask=kpm, memory_key_padding_mask=mem_kpm)
    return (tgt, mem), kw


@pytest.mark.parametrize("bf, nf", LAYOUTS, ids=IDS)
def test_eval_is_bitwise_the_unwrapped_decoder(bf, nf):
    dec = make_decoder(bf, nf, dropout=0.1)
    plain = copy.deepcopy(dec)
    adapters.wrap(dec)
    args, kw = make_inputs(bf)
    dec.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(dec(*args, **kw), plain(*args, **kw))
    assert all("forward" not in m.__dict__ for m in dec.layers.modules())  # host modules untouched


@pytest.mark.parametrize("name", list(ROUTE_SETS))
@pytest.mark.parametrize("bf, nf", LAYOUTS, ids=IDS)
def test_packed_routes_equal_unpacked_oracle(bf, nf, name):
    rs = ROUTE_SETS[name]
    dec = adapters.wrap(make_decoder(bf, nf), rs)
    randomise(dec)  # norms, tokens and the owned copies all differ from the primary's
    args, kw = make_inputs(bf)
    out = dec(*args, **kw)
    got = adapters.route_outputs(dec)
    assert got.hidden_states.shape == (2, len(rs), B, Q, C)
    integration = TorchDecoderIntegration()
    for i, route in enumerate(rs):
        oracle = route_copy(dec, "", integration, i)
        want, per_layer = layer_outputs(oracle, oracle.layers, lambda o=oracle: o(*args, **kw))
        expected_out = out if i == 0 else got.outputs[route.name]
        torch.testing.assert_close(expected_out, want, atol=2e-5, rtol=1e-5, msg=route.name)
        for li, h in enumerate(per_layer):
            h = oracle.norm(h if bf else h.transpose(0, 1))  # DETR's intermediate outputs
            torch.testing.assert_close(got.hidden_states[li, i], h, atol=2e-5, rtol=1e-5)


def test_training_primary_equals_the_unwrapped_training_pass():
    dec, plain = make_decoder(), None
    plain = copy.deepcopy(dec)
    adapters.wrap(dec)
    args, kw = make_inputs()
    torch.testing.assert_close(dec(*args, **kw), plain(*args, **kw), atol=1e-5, rtol=1e-5)


def _aux_params(dec):
    return dict(dec.mrdetr_routes.named_parameters())


def test_gradients_reach_route_and_shared_parameters():
    dec = adapters.wrap(make_decoder())
    randomise(dec)
    args, kw = make_inputs()
    dec(*args, **kw)
    out = adapters.route_outputs(dec)
    out.hidden_states.square().sum().backward()
    names = set(_aux_params(dec))
    assert {"aux.0.aux_instruct.tokens", "aux.1.aux_ffn.ffn.1.weight"} <= names
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.any(), name


def test_primary_loss_leaves_auxiliary_parameters_without_gradient():
    dec = adapters.wrap(make_decoder())
    randomise(dec)
    args, kw = make_inputs()
    dec(*args, **kw).square().sum().backward()
    aux = set(_aux_params(dec))
    for name, p in dec.named_parameters():
        if name.startswith("mrdetr_routes."):
            assert name[len("mrdetr_routes.") :] in aux
            assert p.grad is None or not p.grad.any(), name
        else:
            assert p.grad is not None and p.grad.any(), name


def test_route_copies_start_from_the_primary_weights():
    dec = make_decoder()
    randomise(dec)
    adapters.wrap(dec)
    for layer, owned in zip(dec.layers, dec.mrdetr_routes.aux, strict=True):
        assert torch.equal(owned["aux_ffn"].ffn[0].weight, layer.linear1.weight)
        assert torch.equal(owned["aux_instruct"].self_attn_norm.weight, layer.norm1.weight)
        assert owned["aux_ffn"].ffn[0].weight is not layer.linear1.weight
        assert owned["aux_instruct"].tokens.shape == (10, C)


def test_unwrap_restores_keys_and_keeps_trained_values():
    dec = make_decoder()
    keys = list(dec.state_dict())
    model = nn.Sequential(dec)  # wrap finds the decoder inside a model
    adapters.wrap(model)
    assert any("mrdetr_routes" in k for k in model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args, kw = make_inputs()
    loss = dec(*args, **kw).sum() + adapters.route_outputs(model).hidden_states.square().sum()
    loss.backward()
    opt.step()
    adapters.unwrap(model)
    assert list(dec.state_dict()) == keys
    fresh = make_decoder(seed=5)
    fresh.load_state_dict(dec.state_dict(), strict=True)
    dec.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(*args, **kw), dec(*args, **kw))
    assert not adapters.is_wrapped(model)
    with pytest.raises(ValueError, match="no wrapped decoder"):
        adapters.unwrap(model)


def test_deepcopy_pickle_and_torch_save_of_a_wrapped_model():
    dec = adapters.wrap(make_decoder())
    randomise(dec)
    args, kw = make_inputs()
    want = dec(*args, **kw)  # leaves route outputs (graph tensors) pending: still copyable
    for clone in (
        copy.deepcopy(dec),
        pickle.loads(pickle.dumps(dec)),
        torch.load(_saved(dec), weights_only=False),
    ):
        torch.testing.assert_close(clone(*args, **kw), want, atol=0, rtol=0)
        assert adapters.route_outputs(clone).hidden_states.shape[1] == 3
        pairs = zip(clone.mrdetr_routes.parameters(), dec.mrdetr_routes.parameters(), strict=True)
        for p, q in pairs:
            assert p is not q and torch.equal(p, q)
        adapters.unwrap(clone)
    assert adapters.is_wrapped(dec)


def _saved(module):
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("training", [False, True])
def test_inference_mode(training):
    dec = adapters.wrap(make_decoder())
    plain = copy.deepcopy(dec)
    dec.train(training)
    args, kw = make_inputs()
    with torch.no_grad():
        want = dec(*args, **kw)
    with torch.inference_mode():
        got = dec(*args, **kw)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    del plain


def test_unknown_decoder_error_names_what_it_looked_for_and_the_spec():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError) as err:
        adapters.wrap(model)
    msg = str(err.value)
    for part in ("torch.nn.TransformerDecoder", "MultiRouteDecoder", "DecoderSpec", "self_attn"):
        assert part in msg
    with pytest.raises(ValueError, match="already wrapped"):
        adapters.wrap(adapters.wrap(make_decoder()))
    with pytest.raises(ValueError, match="cross-attention"):
        adapters.wrap(make_decoder(), routes.paper_ablation(4))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        adapters.wrap(make_decoder(), routes.mr_detr_moe())
    with pytest.raises(ValueError, match="no training pass"):
        adapters.route_outputs(adapters.wrap(make_decoder()))


def test_an_interrupted_training_pass_leaves_the_host_untouched():
    dec = adapters.wrap(make_decoder())
    args, kw = make_inputs()
    with pytest.raises(RuntimeError):
        dec(args[0], torch.randn(B, S, C + 1), **kw)  # the host's cross-attention fails
    assert all("forward" not in m.__dict__ for m in dec.layers.modules())
    assert not hasattr(dec.mrdetr_routes, "layout")  # nothing of a pass on the module
    dec(*args, **kw)  # and the next pass runs
    assert adapters.route_outputs(dec).hidden_states.shape[1] == 3


def test_unbatched_input_in_training_is_a_clear_error():
    dec = adapters.wrap(make_decoder())
    with pytest.raises(ValueError, match="batched"):
        dec(torch.randn(Q, C), torch.randn(S, C))


@pytest.mark.slow
def test_torch_compile_eval_graph_and_eager_training_pass():
    dec = adapters.wrap(make_decoder())
    plain = copy.deepcopy(dec)
    adapters.unwrap(plain)
    compiled = torch.compile(dec)
    args, kw = make_inputs()
    dec.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args, **kw), plain(*args, **kw), atol=1e-5, rtol=1e-5)
    dec.train(), plain.train()
    torch.testing.assert_close(compiled(*args, **kw), plain(*args, **kw), atol=1e-5, rtol=1e-5)
    assert adapters.route_outputs(dec).hidden_states.shape[1] == 3
    assert all("forward" not in m.__dict__ for m in dec.layers.modules())
