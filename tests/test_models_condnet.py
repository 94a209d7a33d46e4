"""CondNet heads against a functional reference written from docs/design.md ("Conditional classifier") and the
DeepLabV3(+) structure."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkit.models.segmentation import CondASPPHead, CondDepthwiseSeparableASPPHead, FCNHead
from normkit.nn import dice_loss

K, CH = 5, 16
IN = (64, 128, 256, 512)


def _features(batch=2):
    return [torch.randn(batch, 64, 16, 16), torch.randn(batch, 128, 8, 8), torch.randn(batch, 256, 8, 8),
            torch.randn(batch, 512, 8, 8)]


def _randomize_norms(head):
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return head


def _cbr(m, x):
    """conv -> eval BN -> ReLU, from the module's tensors."""
    conv, bn = m.conv, m.bn
    y = F.conv2d(x, conv.weight, None, 1, conv.padding, conv.dilation, conv.groups)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return F.relu(y)


def _dsconv(m, x):
    return _cbr(m.pointwise_conv, _cbr(m.depthwise_conv, x))


def reference_conditional_classifier(x, guidance_w, guidance_b, filter_w, filter_b, with_bias=True):
    """docs/design.md: guidance G, class embeddings E, grouped kernel generation (first K*C outputs are the
    weights, the last K the biases), dynamic classification."""
    b, c, h, w = x.shape
    k = guidance_w.shape[0]
    g = F.conv2d(x, guidance_w, guidance_b)
    p = torch.softmax(g, 1).reshape(b, k, h * w)
    e = torch.einsum("bki,bci->bkc", p, x.reshape(b, c, h * w)) / (h * w)
    params = F.conv2d(e.reshape(b, k * c, 1, 1), filter_w, filter_b, groups=k).reshape(b, -1)
    weight = params[:, :k * c].reshape(b, k, c)
    y = torch.einsum("bkc,bci->bki", weight, x.reshape(b, c, h * w)).reshape(b, k, h, w)
    if with_bias:
        y = y + params[:, k * c:].reshape(b, k, 1, 1)
    return y, g


def reference_head(head, features):
    x = features[3]
    pooled = _cbr(head.image_pool[1], F.adaptive_avg_pool2d(x, 1))
    outs = [F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)]
    for branch in head.aspp_modules:
        outs.append(_dsconv(branch, x) if hasattr(branch, "depthwise_conv") else _cbr(branch, x))
    y = _cbr(head.bottleneck, torch.cat(outs, 1))
    if isinstance(head, CondDepthwiseSeparableASPPHead):
        c1 = _cbr(head.c1_bottleneck, features[0])
        y = F.interpolate(y, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        y = torch.cat([y, c1], 1)
        y = _dsconv(head.sep_bottleneck[1], _dsconv(head.sep_bottleneck[0], y))
    cls = head.classifier
    return reference_conditional_classifier(y, cls.guidance_project["conv"].weight, cls.guidance_project["conv"].bias,
                                            cls.filter_project["conv"].weight, cls.filter_project["conv"].bias,
                                            cls.with_bias)


@pytest.mark.parametrize("cls,with_bias", [(CondASPPHead, True), (CondDepthwiseSeparableASPPHead, True),
                                           (CondDepthwiseSeparableASPPHead, False)])
def test_cond_heads_match_reference(cls, with_bias):
    kwargs = {"c1_in_channels": 64, "c1_channels": 8} if cls is CondDepthwiseSeparableASPPHead else {}
    head = _randomize_norms(cls(IN, K, channels=CH, dilations=(1, 2, 3, 4), norm="bn", dropout=0.0,
                                cond_layer_with_bias=with_bias, **kwargs))
    feats = _features()
    with torch.no_grad():
        expected_logits, expected_guidance = reference_head(head, feats)
        head.eval()
        out = head(feats)
        head.train()
        for m in head.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        train_out = head(feats)
    stride = 4 if cls is CondDepthwiseSeparableASPPHead else 8
    assert out["logits"].shape == (2, K, 64 // stride, 64 // stride)
    torch.testing.assert_close(out["logits"], expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(train_out["guidance_logits"], expected_guidance, atol=1e-4, rtol=1e-4)


def test_sep_aspp_structure_matches_released_config():
    head = CondDepthwiseSeparableASPPHead((256, 512, 1024, 2048), 150, norm="bn")
    assert isinstance(head.aspp_modules[0].conv, nn.Conv2d) and head.aspp_modules[0].conv.kernel_size == (1, 1)
    assert [m.depthwise_conv.conv.dilation[0] for m in head.aspp_modules[1:]] == [12, 24, 36]
    assert head.bottleneck.conv.in_channels == 5 * 512 and head.c1_bottleneck.conv.out_channels == 48
    assert head.sep_bottleneck[0].depthwise_conv.conv.in_channels == 512 + 48
    assert head.classifier.filter_project["conv"].weight.shape == (150 * 512 + 150, 512, 1, 1)
    with pytest.raises(ValueError, match="c1_in_channels"):
        CondDepthwiseSeparableASPPHead((64, 128, 256, 512), 4, norm="bn")


def test_aspp_structure_matches_mmseg_aspp_head():
    # mmseg ASPPModule: a 1x1 conv for dilation 1, 3x3 convs of dilation 6, 12, 18 (the default) otherwise
    head = CondASPPHead(IN, K, channels=CH, norm="bn")
    convs = [m.conv for m in head.aspp_modules]
    assert [(c.kernel_size, c.dilation) for c in convs] == [((1, 1), (1, 1)), ((3, 3), (6, 6)), ((3, 3), (12, 12)),
                                                           ((3, 3), (18, 18))]
    assert head.bottleneck.conv.kernel_size == (3, 3) and head.bottleneck.conv.in_channels == 5 * CH


def test_guidance_loss_is_weighted_dice_on_nearest_labels():
    head = CondDepthwiseSeparableASPPHead(IN, K, channels=CH, c1_in_channels=64, c1_channels=8, norm="bn",
                                          guidance_weight=0.2).train()
    out = head(_features())
    labels = torch.randint(0, K, (2, 64, 64))
    labels[:, :8] = 255
    losses = head.extra_losses(out, labels)
    expected = 0.2 * dice_loss(out["guidance_logits"], labels[:, ::4, ::4], ignore_index=255)
    torch.testing.assert_close(losses["guidance_loss"], expected)
    assert head.extra_losses({"logits": out["logits"]}, labels) == {}


def test_fcn_auxiliary_head():
    head = _randomize_norms(FCNHead(IN, K, in_index=2, channels=CH, num_convs=1, dropout=0.1, norm="bn")).eval()
    feats = _features()
    with torch.no_grad():
        expected = F.conv2d(_cbr(head.convs[0], feats[2]), head.conv_seg.weight, head.conv_seg.bias)
        torch.testing.assert_close(head(feats)["logits"], expected)
    assert head.convs[0].conv.kernel_size == (3, 3) and len(head.convs) == 1
    assert sorted(k for k in head.state_dict() if not k.startswith("convs.0.bn")) == \
        ["conv_seg.bias", "conv_seg.weight", "convs.0.conv.weight"]
