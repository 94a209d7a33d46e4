"""Segmentation heads and models: output shapes, deep supervision, losses, DeepLab v2 multi-scale fusion."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normkit.models.backbones.resnet import ResNet
from normkit.models.segmentation.common import resize_labels
from normkit.models.segmentation import (C1, C1DeepSup, PPM, PPMDeepSup, UPerNet, ASPPSumHead, DeepLabV2,
                                         SegmentationModel)

K = 5
R18 = (64, 128, 256, 512)


def _features(channels=R18, size=64, strides=(4, 8, 8, 8), batch=2):
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(channels, strides)]


@pytest.mark.parametrize("cls,deepsup", [(C1, False), (C1DeepSup, True), (PPM, False), (PPMDeepSup, True)])
def test_csail_heads_output_at_decoder_stride(cls, deepsup):
    head = cls(R18, K).train()
    out = head(_features())
    assert out["logits"].shape == (2, K, 8, 8)
    assert ("deepsup_logits" in out) == deepsup
    if deepsup:
        assert out["deepsup_logits"].shape == (2, K, 8, 8)
    head.eval()
    assert set(head(_features())) == {"logits"}  # deep supervision is a training-only branch


@pytest.mark.parametrize("fpn_dim", [512, 256])
def test_upernet_output_at_stride_4(fpn_dim):
    head = UPerNet(R18, K, fpn_dim=fpn_dim)
    out = head(_features(strides=(4, 8, 16, 32)))
    assert out["logits"].shape == (2, K, 16, 16)
    assert head.conv_last[1].in_channels == fpn_dim and head.ppm_last_conv[0].out_channels == fpn_dim


def test_csail_structure_and_init():
    head = PPMDeepSup((256, 512, 1024, 2048), K)
    assert head.conv_last[0].in_channels == 2048 + 4 * 512
    assert head.cbr_deepsup[0].in_channels == 1024 and head.cbr_deepsup[0].out_channels == 512
    assert isinstance(head.conv_last[3], torch.nn.Dropout2d) and head.conv_last[3].p == 0.1
    assert torch.all(head.conv_last[1].weight == 1) and torch.allclose(head.conv_last[1].bias,
                                                                      torch.full((512,), 1e-4))
    c1 = C1DeepSup((256, 512, 1024, 2048), K)
    assert c1.cbr[0].out_channels == 512 and c1.cbr_deepsup[0].in_channels == 1024
    # CSAIL's weights_init matches "BatchNorm" class names only: SN (the SN fork) and GN keep weight 1, bias 0
    for norm in ("sn", "gn"):
        layer = C1DeepSup((256, 512, 1024, 2048), K, norm=norm).cbr[1]
        assert torch.all(layer.weight == 1) and torch.all(layer.bias == 0), norm


def test_csail_decoder_convs_start_kaiming_normal():
    # CSAIL's weights_init: nn.init.kaiming_normal_ (fan_in, gain sqrt 2) on every conv of the decoder
    torch.manual_seed(0)
    head = PPMDeepSup((256, 512, 1024, 2048), K)
    for conv in (head.cbr_deepsup[0], head.ppm[0][1], head.conv_last[0]):
        fan_in = conv.weight[0].numel()
        assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.03)
        assert abs(conv.weight.mean().item()) < 0.1 * (2 / fan_in) ** 0.5


def test_upernet_pyramid_pools_upsamples_then_convolves_as_csail():
    # CSAIL's UPerNet: pool_conv(interpolate(pool_scale(conv5), conv5 size)), conv-BN-ReLU after the upsampling;
    # the ReLU does not commute with the interpolation, so the order shows on a 5 x 7 map
    torch.manual_seed(0)
    head = UPerNet(R18, K, fpn_dim=32).eval()
    features = [torch.randn(1, c, 5 * 8 // s, 7 * 8 // s) for c, s in zip(R18, (1, 2, 4, 8))]
    top = features[-1]
    seen = []
    head.ppm_last_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        head(features)
        expected = [top] + [conv(F.interpolate(F.adaptive_avg_pool2d(top, scale), size=(5, 7), mode="bilinear",
                                               align_corners=False))
                            for scale, conv in zip((1, 2, 3, 6), head.ppm_conv)]
    torch.testing.assert_close(seen[0], torch.cat(expected, 1))


def test_label_sampling_on_the_align_corners_grid_rounds_to_the_nearest():
    # output i reads input i * (9 - 1) / (4 - 1) = 0, 2.67, 5.33, 8 rounded: 0, 3, 5, 8 (rows and columns)
    labels = (10 * torch.arange(9)[:, None] + torch.arange(9)[None])[None]
    expected = torch.tensor([[10 * r + c for c in (0, 3, 5, 8)] for r in (0, 3, 5, 8)])
    assert torch.equal(resize_labels(labels, (4, 4), "corners")[0], expected)
    assert torch.equal(resize_labels(labels, (1, 1), "corners")[0], torch.tensor([[0]]))


def _seg_model(head_cls=C1DeepSup, loss_mode="downsample_labels", norm="bn"):
    backbone = ResNet(18, stem="deep", output_stride=8, norm=norm)
    return SegmentationModel(backbone, head_cls(backbone.out_channels, K, norm=norm), num_classes=K,
                             loss_mode=loss_mode)


def _labels(batch=2, size=64):
    labels = torch.randint(0, K, (batch, size, size))
    labels[:, :5] = 255
    return labels


@pytest.mark.parametrize("size", [(4, 5), (8, 10), (16, 20)])
def test_label_sampling_at_centres_is_pils_nearest(size):
    # CSAIL pads to a multiple of the stride, so its factors are whole (PIL breaks exact ties at other factors
    # downwards)
    from PIL import Image
    labels = torch.randint(0, 150, (1, 32, 40))
    expected = np.asarray(Image.fromarray(labels[0].numpy().astype(np.uint8)).resize(size[::-1], Image.NEAREST))
    assert torch.equal(resize_labels(labels, size, "centres")[0], torch.from_numpy(expected.astype(np.int64)))


def test_csail_loss_at_decoder_stride_with_deep_supervision():
    torch.manual_seed(0)
    model = _seg_model().train()
    images, labels = torch.randn(2, 3, 32, 32), _labels(size=32)
    torch.manual_seed(1)
    losses = model({"images": images, "labels": labels})
    assert set(losses) == {"decode_loss", "deepsup_loss", "pixel_acc"}
    # reference: recompute both heads' outputs with the same BN batch and compare the CE terms
    torch.manual_seed(1)
    out = model.decode_head(list(model.backbone(images).values()))
    small = labels[:, 4::8, 4::8]  # CSAIL's PIL NEAREST reads the pixel at the centre of each 8 x 8 cell
    ce = F.cross_entropy(out["logits"], small, ignore_index=255)
    ce_ds = F.cross_entropy(out["deepsup_logits"], small, ignore_index=255)
    torch.testing.assert_close(losses["decode_loss"], ce)
    torch.testing.assert_close(losses["deepsup_loss"], 0.4 * ce_ds)
    valid = small != 255
    acc = ((out["logits"].argmax(1) == small) & valid).sum() / valid.sum()
    torch.testing.assert_close(losses["pixel_acc"], acc.float())
    sum(v for k, v in losses.items() if k.endswith("loss")).backward()
    assert model.decode_head.conv_last_deepsup.weight.grad is not None


def test_deep_supervision_weight_and_gradient_reach_layer3():
    torch.manual_seed(0)
    backbone = ResNet(18, stem="deep", output_stride=8, norm="bn")
    model = SegmentationModel(backbone, C1DeepSup(backbone.out_channels, K), num_classes=K, deep_sup_weight=0.25,
                              aux_weight=0.7).train()
    images, labels = torch.randn(2, 3, 32, 32), _labels(size=32)
    losses = model({"images": images, "labels": labels})
    out = model.decode_head(list(model.backbone(images).values()))
    small = labels[:, 4::8, 4::8]
    torch.testing.assert_close(losses["deepsup_loss"],
                               0.25 * F.cross_entropy(out["deepsup_logits"], small, ignore_index=255))
    # the deep-supervision branch supervises the backbone's layer 3 (and nothing of layer 4)
    model.zero_grad()
    losses["deepsup_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.layer3.parameters())
    assert all(p.grad is None for p in model.backbone.layer4.parameters())


def test_mmseg_loss_upsamples_logits():
    model = _seg_model(C1, loss_mode="upsample_logits").train()  # no dropout in C1: same BN batch below
    images, labels = torch.randn(2, 3, 32, 32), _labels(size=32)
    losses = model({"images": images, "labels": labels})
    logits = F.interpolate(model.decode_head(list(model.backbone(images).values()))["logits"], size=(32, 32),
                           mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["decode_loss"], F.cross_entropy(logits, labels, ignore_index=255))


def test_eval_upsamples_the_logits_bilinearly_to_the_input_resolution():
    model = _seg_model(PPMDeepSup).eval()
    images = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        assert model(images).shape == (2, K, 40, 24)

    class Ramp(torch.nn.Module):
        """Stand-in head: logits equal to the column index of the stride-8 map (5 x 3 for a 40 x 24 input)."""

        def forward(self, features):
            h, w = features[-1].shape[-2:]
            return {"logits": torch.arange(w, dtype=torch.float32).expand(2, K, h, w)}

    model.decode_head = Ramp()
    with torch.no_grad():
        logits = model(images)
    # bilinear, align_corners=False: output column x samples input column (x + 0.5) * 3 / 24 - 0.5, clamped
    expected = ((torch.arange(24, dtype=torch.float32) + 0.5) / 8 - 0.5).clamp(0, 2)
    torch.testing.assert_close(logits, expected.expand(2, K, 40, 24))


def test_all_ignored_labels_give_zero_loss():
    model = _seg_model(C1).train()
    losses = model({"images": torch.randn(2, 3, 32, 32), "labels": torch.full((2, 32, 32), 255, dtype=torch.long)})
    assert losses["decode_loss"].item() == 0 and losses["pixel_acc"].item() == 0


def test_bad_inputs():
    model = _seg_model(C1).train()
    with pytest.raises(ValueError, match="labels must be in"):
        model({"images": torch.randn(2, 3, 32, 32), "labels": torch.full((2, 32, 32), K, dtype=torch.long)})
    with pytest.raises(ValueError, match="int64"):
        model({"images": torch.randn(2, 3, 32, 32), "labels": torch.zeros(2, 32, 32, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"Tensor\[B, 3, H, W\]"):
        model(torch.randn(3, 32, 32))


def _deeplab():
    backbone = ResNet(18, stem="v1", output_stride=8, dilation_rule="deeplab",
                      ceil_mode=True, norm="frozenbn")
    return DeepLabV2(backbone, ASPPSumHead(backbone.out_channels, K), num_classes=K)


def test_aspp_sum_head():
    head = ASPPSumHead(R18, K)
    assert [c.dilation[0] for c in head.conv2d_list] == [6, 12, 18, 24]
    assert all(c.bias is not None for c in head.conv2d_list)
    assert 0.005 < head.conv2d_list[0].weight.std().item() < 0.015
    x = _features()
    expected = sum(F.conv2d(x[-1], c.weight, c.bias, padding=c.dilation, dilation=c.dilation)
                   for c in head.conv2d_list)
    torch.testing.assert_close(head(x)["logits"], expected)


def test_deeplab_v2_multiscale_sizes_and_max_fusion():
    model = _deeplab().eval()
    images = torch.randn(1, 3, 49, 49)
    with torch.no_grad():
        outputs = model.forward_scales(images)
        # reference from the definition: inputs at int(49*s)+1, outputs resized (align_corners=True)
        # to the scale-1 output size, element-wise max
        run = lambda x: model.decode_head(list(model.backbone(x).values()))["logits"]  # noqa: E731
        ref1 = run(images)
        size = ref1.shape[-2:]
        refs = [ref1] + [F.interpolate(run(F.interpolate(images, size=(n, n), mode="bilinear", align_corners=True)),
                                       size=size, mode="bilinear", align_corners=True) for n in (37, 25)]
    assert len(outputs) == 4 and size == (7, 7)
    for out, ref in zip(outputs, refs):
        torch.testing.assert_close(out, ref)
    torch.testing.assert_close(outputs[3], torch.max(torch.max(refs[0], refs[1]), refs[2]))
    with torch.no_grad():
        assert model(images).shape == (1, K, 49, 49)


def test_deeplab_v2_training_sums_four_losses():
    model = _deeplab().train()
    images, labels = torch.randn(1, 3, 49, 49), _labels(1, 49)
    losses = model({"images": images, "labels": labels})
    assert set(losses) == {"scale1_loss", "scale0.75_loss", "scale0.5_loss", "fused_loss", "pixel_acc"}
    # labels on the port's align_corners grid: output i reads input round(i * 48 / (n - 1))
    with torch.no_grad():
        fused = model.forward_scales(images)[-1]
    n = fused.shape[-1]
    grid = [int(i * 48 / (n - 1) + 0.5) for i in range(n)]
    expected = F.cross_entropy(fused, labels[:, grid][:, :, grid], ignore_index=255)
    torch.testing.assert_close(losses["fused_loss"].detach(), expected)
    sum(v for k, v in losses.items() if k.endswith("loss")).backward()
    assert model.decode_head.conv2d_list[3].weight.grad is not None
    assert not any(p.requires_grad for p in model.backbone.bn1.parameters())  # frozen BN has no parameters
