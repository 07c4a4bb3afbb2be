"""Auxiliary routes trained by the HF family's own loss (mrdetr.adapters.host_loss).

Oracles: transformers' own forward (its ``loss`` / ``loss_dict``) and its own Hungarian matchers;
hand-built predictions whose one-to-many pairs are known.
"""

import pytest
import torch

tf = pytest.importorskip("transformers")

from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher  # noqa: E402
from transformers.loss.loss_for_object_detection import HungarianMatcher  # noqa: E402
from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher  # noqa: E402

from mrdetr.adapters.host_loss import host_auxiliary_loss, host_route_loss  # noqa: E402
from mrdetr.adapters.host_loss_families import family_of  # noqa: E402
from mrdetr.adapters.host_matcher import HostMatcher  # noqa: E402
from mrdetr.matching import OneToManyMatcher  # noqa: E402
from mrdetr.testing import hf_models  # noqa: E402


def _backbone_kwargs(config_cls) -> dict:
    import inspect

    params = inspect.signature(config_cls.__init__).parameters
    if "use_timm_backbone" not in params:  # 5.x
        return {}
    return {"use_timm_backbone": False, "backbone": None, "use_pretrained_backbone": False}


def _detr():
    """A tiny random DetrForObjectDetection (transformers' own ResNet, no download)."""
    backbone = tf.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 64],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage4"],
    )
    config = tf.DetrConfig(
        backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_queries=10, num_labels=3, dropout=0.0,
        **_backbone_kwargs(tf.DetrConfig),
    )  # fmt: skip
    torch.manual_seed(0)
    return tf.DetrForObjectDetection(config).train()


def _hungarian(family: str, config):
    if family == "rt_detr":
        return RTDetrHungarianMatcher(config)
    cls = HungarianMatcher if family == "detr" else DeformableDetrHungarianMatcher
    return cls(class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)


BUILDERS = {
    "detr": _detr,
    "deformable_detr": hf_models.hf_deformable_detr,
    "rt_detr": lambda: hf_models.hf_rt_detr(num_denoising=0),
}


def _layer(d):
    return {"pred_logits": d["logits"], "pred_boxes": d["pred_boxes"]}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def host(request):
    """``(family, model, labels, output, primary route predictions)`` with every layer
    supervised (``config.auxiliary_loss = True``)."""
    model = BUILDERS[request.param]()
    model.config.auxiliary_loss = True
    pixels, labels = hf_models.random_detection_batch(batch=2, image_size=96, seed=1)
    labels = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in labels]
    out = model(pixel_values=pixels, labels=labels)
    aux = list(out.auxiliary_outputs)
    route = {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}
    if request.param == "rt_detr":  # its auxiliary_outputs end with the encoder proposals
        route["enc_outputs"] = _layer(aux.pop())
    route["aux_outputs"] = [_layer(a) for a in aux]
    return request.param, model, labels, out, route


def test_family_table_reproduces_host_loss_with_its_own_matcher(host):
    family, model, labels, out, route = host
    assert family_of(model).name == family
    loss, loss_dict = host_route_loss(model, route, labels, _hungarian(family, model.config))
    assert torch.equal(loss, out.loss)
    assert sorted(loss_dict) == sorted(out.loss_dict)
    for key, value in out.loss_dict.items():
        assert torch.equal(loss_dict[key], value), key


def test_route_without_encoder_proposals_drops_their_terms(host):
    family, model, labels, out, route = host
    route = {k: v for k, v in route.items() if k != "enc_outputs"}
    loss, loss_dict = host_route_loss(model, route, labels, _hungarian(family, model.config))
    if family != "rt_detr":  # no encoder term in these losses: nothing changes
        assert torch.equal(loss, out.loss)
        return
    n = len(route["aux_outputs"]) + 1
    kept = {k: v for k, v in out.loss_dict.items() if not k.endswith(f"_aux_{n - 1}")}
    assert sorted(loss_dict) == sorted(kept)
    torch.testing.assert_close(loss, sum(kept.values()))


def _near_copies(labels, num_queries: int, num_labels: int, copies: int):
    """Predictions with ``copies`` near-exact boxes per gt (IoU > 0.9) and far-away tiny boxes
    elsewhere; ``copies * N_b <= num_queries``."""
    b = len(labels)
    boxes = torch.tensor([0.02, 0.02, 0.01, 0.01]).repeat(b, num_queries, 1)
    for i, t in enumerate(labels):
        for c in range(copies):
            scale = torch.tensor([1.0, 1.0, 1.0 + 0.01 * c, 1.0])
            boxes[i, c * len(t["boxes"]) : (c + 1) * len(t["boxes"])] = t["boxes"] * scale
    logits = torch.zeros(b, num_queries, num_labels)
    return logits, boxes


class _Counting:
    """A matcher with transformers' interface that records its number of pairs."""

    def __init__(self, inner):
        self.inner, self.pairs, self.calls = inner, [], 0

    def __call__(self, outputs, targets, *args):
        self.calls += 1
        indices = self.inner(outputs, targets, *args)
        self.pairs.append(sum(len(p) for p, _ in indices))
        return indices


def test_one_to_many_pairs_each_gt_with_its_near_copies(host):
    family, model, labels, _, _ = host
    q, k = model.config.num_queries, model.config.num_labels
    logits, boxes = _near_copies(labels, q, k + (family == "detr"), copies=3)
    route = {"pred_logits": logits, "pred_boxes": boxes}
    route["aux_outputs"] = [dict(route)] * (model.config.decoder_layers - 1)
    n_gt = sum(len(t["boxes"]) for t in labels)
    ours = _Counting(HostMatcher(family_of(model).class_score(model.config)))
    theirs = _Counting(_hungarian(family, model.config))
    host_route_loss(model, route, labels, ours)
    host_route_loss(model, route, labels, theirs)
    # independent count: 3 copies of every gt are positives (IoU > 0.9 gives quality > 0.4)
    assert set(ours.pairs) == {3 * n_gt}
    assert set(theirs.pairs) == {n_gt}


def test_softmax_scores_reach_the_matcher_as_probabilities():
    logits = torch.randn(2, 5, 4)
    prob = logits.softmax(-1)
    no_object = HostMatcher("softmax_no_object").match_logits(logits)
    torch.testing.assert_close(no_object.sigmoid(), prob[..., :-1])
    torch.testing.assert_close(HostMatcher("softmax").match_logits(logits).sigmoid(), prob)
    with pytest.raises(ValueError, match="class_score"):
        HostMatcher("softmax_with_background")


def test_group_detr_matches_each_group_on_its_own():
    gt_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]])
    labels = [{"class_labels": torch.tensor([0, 2]), "boxes": gt_boxes}]
    logits, boxes = _near_copies(labels, 6, 3, copies=2)
    logits2, boxes2 = _near_copies(labels, 6, 3, copies=1)
    outputs = {
        "logits": torch.cat([logits, logits2], 1),
        "pred_boxes": torch.cat([boxes, boxes2], 1),
    }
    grouped = HostMatcher()(outputs, labels, group_detr=2)
    plain = OneToManyMatcher()
    targets = [{"labels": labels[0]["class_labels"], "boxes": labels[0]["boxes"]}]
    ((p0, g0),) = plain({"pred_logits": logits, "pred_boxes": boxes}, targets)
    ((p1, g1),) = plain({"pred_logits": logits2, "pred_boxes": boxes2}, targets)
    assert torch.equal(grouped[0][0], torch.cat([p0, p1 + 6]))
    assert torch.equal(grouped[0][1], torch.cat([g0, g1]))
    with pytest.raises(ValueError, match="group_detr"):
        HostMatcher()(outputs, labels, group_detr=5)


def _leaf_route(route):
    """The route with every layer's logits and boxes as fresh leaf tensors (no encoder)."""
    layers = [*route["aux_outputs"], route]
    leaves = [{k: x[k].detach().clone().requires_grad_() for k in ("pred_logits", "pred_boxes")}
              for x in layers]  # fmt: skip
    return {**leaves[-1], "aux_outputs": leaves[:-1]}, leaves


def test_route_weights_scale_and_zero_drops_the_route(host):
    family, model, labels, _, route = host
    a, _ = _leaf_route(route)
    b, _ = _leaf_route(route)
    routes = {"aux_ffn": a, "aux_instruct": b}
    one, _ = host_auxiliary_loss(model, {"aux_ffn": a}, labels)
    counting = {"aux_ffn": _Counting(HostMatcher(family_of(model).class_score(model.config)))}
    counting["aux_instruct"] = _Counting(counting["aux_ffn"].inner)
    loss, loss_dict = host_auxiliary_loss(
        model, routes, labels, route_weights={"aux_ffn": 2.0, "aux_instruct": 0}, matcher=counting
    )
    assert counting["aux_instruct"].calls == 0 and counting["aux_ffn"].calls > 0
    assert loss_dict and all(k.startswith("aux_ffn/") for k in loss_dict)
    torch.testing.assert_close(loss, 2.0 * one)
    both, both_dict = host_auxiliary_loss(model, routes, labels)  # default weights 1, 1
    torch.testing.assert_close(both, 2.0 * one)
    assert {k.split("/")[0] for k in both_dict} == {"aux_ffn", "aux_instruct"}


def test_gradients_reach_every_layer_of_the_route(host):
    _, model, labels, _, route = host
    leaf, leaves = _leaf_route(route)
    loss, _ = host_auxiliary_loss(model, {"aux_ffn": leaf}, labels)
    loss.backward()
    for i, layer in enumerate(leaves):
        for key, x in layer.items():
            assert x.grad is not None and x.grad.abs().sum() > 0, (i, key)


@pytest.mark.parametrize(
    ("weights", "match"),
    [({"aux_fn": 1.0}, r"route_weights: unknown routes \['aux_fn'\]"),
     ({"aux_ffn": -1.0}, r"route_weights\['aux_ffn'\] must be a finite number >= 0"),
     ({"aux_ffn": float("nan")}, r"route_weights\['aux_ffn'\]")],
)  # fmt: skip
def test_bad_route_weights_raise(host, weights, match):
    _, model, labels, _, route = host
    with pytest.raises(ValueError, match=match):
        host_auxiliary_loss(model, {"aux_ffn": route}, labels, route_weights=weights)


def test_unsupported_model_and_missing_layers_raise(host):
    _, model, labels, _, route = host
    with pytest.raises(ValueError, match="no host-loss family"):
        host_route_loss(torch.nn.Linear(2, 2), route, labels)
    short = {k: v for k, v in route.items() if k != "aux_outputs"}
    with pytest.raises(ValueError, match="config.decoder_layers"):
        host_route_loss(model, short, labels)
