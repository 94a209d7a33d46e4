"""Every loss term and published model hyperparameter against values written down from the original code.

The expected numbers below come from the original repositories (CSAIL semantic-segmentation-pytorch, its SN
fork, CondNet's mmseg configs, the DeepLab v2 port), not from normkit: changing a loss weight, a dilation or the
way a loss is computed must fail here.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normkit.models import build_model, read_config
from normkit.models.segmentation import DeepLabV2, SegmentationModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# CondNet's configs/_base_/models/condnet_r50-d8.py: CondDepthwiseSeparableASPPHead dilations (1, 12, 24, 36),
# dropout_ratio 0.1, mmseg CrossEntropyLoss (avg_non_ignore=False: the mean over all pixels)
CONDNET_HEAD = {"decode_head.aspp_modules.1.depthwise_conv.conv.dilation": (12, 12),
                "decode_head.aspp_modules.2.depthwise_conv.conv.dilation": (24, 24),
                "decode_head.aspp_modules.3.depthwise_conv.conv.dilation": (36, 36),
                "decode_head.classifier.dropout.p": 0.1, "ce_average": "all_pixels"}

# config -> {attribute path on the built model: published value}
PUBLISHED = {
    "csail/r50d8_c1_deepsup": {"deep_sup_weight": 0.4, "loss_mode": "downsample_labels", "ignore_index": 255,
                               "backbone.output_stride": 8, "backbone.stem": "deep"},
    "csail/r50d8_ppm_deepsup": {"deep_sup_weight": 0.4, "loss_mode": "downsample_labels",
                                "backbone.output_stride": 8, "decode_head.dropout_deepsup.p": 0.1},
    "csail/r50_upernet": {"backbone.output_stride": 32, "decode_head.fpn_out.0.0.0.out_channels": 512},
    "csail/r101d8_ppm_deepsup": {"deep_sup_weight": 0.4, "backbone.output_stride": 8,
                                 "decode_head.dropout_deepsup.p": 0.1},
    "csail/r18d8_c1_deepsup": {"deep_sup_weight": 0.4, "backbone.output_stride": 8},
    "sn/r50d8_sn_c1_deepsup": {"deep_sup_weight": 0.4, "backbone.output_stride": 8},
    "condnet/r50d8_cond_sep_aspp_ade20k": {
        "aux_weight": 0.4, "loss_mode": "upsample_logits", "decode_head.guidance_weight": 0.2,
        "backbone.output_stride": 8, "backbone.stem": "v1c", "auxiliary_head.in_index": 2,
        "decode_head.c1_bottleneck.conv.out_channels": 48, "num_classes": 150, **CONDNET_HEAD},
    "condnet/r101d8_cond_sep_aspp_ade20k": {"aux_weight": 0.4, "decode_head.guidance_weight": 0.2,
                                            "num_classes": 150, **CONDNET_HEAD},
    "condnet/r101d8_cond_sep_aspp_pascal_context59": {"aux_weight": 0.4, "decode_head.guidance_weight": 0.2,
                                                      "num_classes": 59, **CONDNET_HEAD},
    "deeplab/r101_deeplab_v2_voc": {"scales": (1.0, 0.75, 0.5), "num_classes": 21,
                                    "decode_head.conv2d_list.0.dilation": (6, 6),
                                    "decode_head.conv2d_list.3.dilation": (24, 24)},
}


def _attr(obj, path: str):
    """`path`'s value: dotted attribute names and indices of a module, or keys of a config section."""
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj[part]
        else:
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_build_the_published_hyperparameters(name):
    model = build_model(CONFIGS / f"{name}.yaml")
    for path, expected in PUBLISHED[name].items():
        assert _attr(model, path) == expected, f"{name}: {path}"


def test_default_loss_weights_are_the_published_ones():
    import inspect
    defaults = {k: v.default for k, v in inspect.signature(SegmentationModel).parameters.items()}
    assert defaults["deep_sup_weight"] == 0.4 and defaults["aux_weight"] == 0.4  # CSAIL deep sup., mmseg FCN aux


def _tiny_cfg(**model):
    backbone = {"name": "resnet18", "output_stride": 8, "norm": "frozenbn"}  # no batch statistics: repeatable
    return {"model": {"num_classes": 4, "backbone": backbone, **model}}


def _labels(batch, size):
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (batch, size, size), generator=gen)
    labels[:, :3] = 255
    return labels


def test_auxiliary_loss_is_0_4_times_the_cross_entropy_of_the_upsampled_aux_logits():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(name="encoder_decoder", loss_mode="upsample_logits", decode_head={"name": "c1"},
                                  auxiliary_head={"name": "fcn", "in_index": 2, "channels": 16,
                                                  "dropout": 0.0})).train()
    images, labels = torch.randn(2, 3, 32, 32), _labels(2, 32)
    losses = model({"images": images, "labels": labels})
    features = list(model.backbone(images).values())
    aux = F.interpolate(model.auxiliary_head(features)["logits"], size=(32, 32), mode="bilinear", align_corners=False)
    decode = F.interpolate(model.decode_head(features)["logits"], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["aux_loss"], 0.4 * F.cross_entropy(aux, labels, ignore_index=255))
    torch.testing.assert_close(losses["decode_loss"], F.cross_entropy(decode, labels, ignore_index=255))
    assert sorted(k for k in losses if k.endswith("loss")) == ["aux_loss", "decode_loss"]


def test_deeplab_v2_sums_one_loss_per_scale_and_one_for_the_max_fusion():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(name="deeplab_v2", decode_head={"name": "aspp_sum"})).train()
    assert isinstance(model, DeepLabV2)
    images, labels = torch.randn(1, 3, 41, 41), _labels(1, 41)
    losses = model({"images": images, "labels": labels})

    def logits(x):
        return model.decode_head(list(model.backbone(x).values()))["logits"]

    # The port: inputs at int(s * 41) + 1 for s = 0.75, 0.5; outputs resized (align_corners=True) to the x1 size.
    full = logits(images)
    per_scale = [full]
    for s in (0.75, 0.5):
        size = int(41 * s) + 1
        small = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)
        per_scale.append(F.interpolate(logits(small), size=full.shape[-2:], mode="bilinear", align_corners=True))
    fused = torch.stack(per_scale).max(0).values
    # labels: the nearest on the port's align_corners grid, input round(i * 40 / (n - 1)) for output i
    n = full.shape[-1]
    grid = [int(i * 40 / (n - 1) + 0.5) for i in range(n)]
    target = labels[:, grid][:, :, grid]
    expected = [F.cross_entropy(x, target, ignore_index=255) for x in per_scale + [fused]]
    names = ["scale1_loss", "scale0.75_loss", "scale0.5_loss", "fused_loss"]
    for name, value in zip(names, expected):
        torch.testing.assert_close(losses[name], value, msg=name)
    assert sorted(k for k in losses if k.endswith("loss")) == sorted(names)


def test_condnet_guidance_loss_is_0_2_times_dice_of_the_guidance_logits_at_their_own_resolution():
    from normkit.nn import dice_loss
    torch.manual_seed(0)
    head = {"name": "cond_aspp", "channels": 16, "dilations": [1, 2], "dropout": 0.0}
    model = build_model(_tiny_cfg(name="encoder_decoder", loss_mode="upsample_logits", decode_head=head)).train()
    images, labels = torch.randn(2, 3, 32, 32), _labels(2, 32)
    losses = model({"images": images, "labels": labels})
    outputs = model.decode_head(list(model.backbone(images).values()))
    guidance = outputs["guidance_logits"]
    small = F.interpolate(labels[:, None].float(), size=guidance.shape[-2:], mode="nearest")[:, 0].long()
    torch.testing.assert_close(losses["guidance_loss"], 0.2 * dice_loss(guidance, small, ignore_index=255))


# -- input encoding per recipe -------------------------------------------------------------------------------------
# One RGB pixel (R, G, B) = (10, 20, 30) as each original feeds it to its network:
# SwitchNorm_Segmentation: BGR 0..255 minus [102.9801, 115.9465, 122.7717] (its dataset.py); DeepLab v2 port: BGR
# minus [104.008, 116.669, 122.675]; CSAIL and mmseg: RGB / 255, ImageNet mean and std.
_IMAGENET = [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
PUBLISHED_INPUT = {
    "sn/r50d8_sn_c1_deepsup": [30 - 102.9801, 20 - 115.9465, 10 - 122.7717],
    "sn/r50d8_gn_c1_deepsup": [30 - 102.9801, 20 - 115.9465, 10 - 122.7717],
    "sn/r50d8_syncbn_c1_deepsup": [30 - 102.9801, 20 - 115.9465, 10 - 122.7717],
    "deeplab/r101_deeplab_v2_voc": [30 - 104.008, 20 - 116.669, 10 - 122.675],
    "csail/r50d8_ppm_deepsup": _IMAGENET,
    "csail/r50_upernet": _IMAGENET,
    "condnet/r50d8_cond_sep_aspp_ade20k": _IMAGENET,
    "condnet/r101d8_cond_sep_aspp_pascal_context59": _IMAGENET,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_INPUT))
def test_configs_encode_the_input_as_their_original(name):
    from normkit.data.build import segmentation_normalizer
    normalizer = segmentation_normalizer(read_config(name)["data"])
    pixel = np.array([[[10, 20, 30]]], np.uint8)
    x = normalizer.to_tensor(pixel)
    assert x[:, 0, 0].tolist() == pytest.approx(PUBLISHED_INPUT[name], abs=1e-4)
    assert normalizer.denormalize(x).tolist() == pixel.tolist()  # what --show-dir panels display


# -- DeepLab v2 port -----------------------------------------------------------------------------------------------
def test_deeplab_v2_upsamples_its_output_with_align_corners_true():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(name="deeplab_v2", decode_head={"name": "aspp_sum"})).eval()
    images = torch.randn(1, 3, 41, 45)
    with torch.no_grad():
        fused = model.forward_scales(images)[-1]
        logits = model(images)
    # nn.UpsamplingBilinear2d of the port: corner pixels of input and output coincide
    expected = F.interpolate(fused, size=(41, 45), mode="bilinear", align_corners=True)
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(logits[..., 0, 0], fused[..., 0, 0])
    torch.testing.assert_close(logits[..., -1, -1], fused[..., -1, -1])


def test_deeplab_v2_schedule_counts_as_the_port():
    train = read_config("deeplab/r101_deeplab_v2_voc")["train"]
    # train.py: maxIter 20000 images of batch 1, optimizer.step() every iterSize = 10 images
    assert (train["batch_size"], train["iter_size"], train["max_iter"]) == (1, 10, 2000)
    assert train["max_iter"] * train["iter_size"] * train["batch_size"] == 20000
    optimizer = train["optimizer"]
    assert (optimizer["lr"], optimizer["weight_decay"]) == (2.5e-4, 5e-4)
    assert optimizer["momentum"] == 0.0  # a fresh optim.SGD after every step: no momentum carried over
    assert train["lr_schedule"] == {"policy": "poly", "power": 0.9, "min_lr": 0.0}


def test_deeplab_v2_steps_each_parameter_as_the_ports_repeated_listings():
    # The port lists p.parameters() of every module under conv1 and layer1..4 (modules() recurses), so a
    # parameter is listed once per module on its path below the stage; the k-th listing steps with a momentum
    # buffer of 1 + 0.9 + ... + 0.9^(k-1) times the gradient. The classifier is listed once, at 10x.
    from normkit.engine.optimizer import build_param_groups
    cfg = read_config("deeplab/r101_deeplab_v2_voc")
    cfg["model"]["backbone"].pop("pretrained", None)
    model = build_model(cfg)
    optimizer = dict(cfg["train"]["optimizer"])
    groups = build_param_groups(model, optimizer["lr"], optimizer["weight_decay"], lr_mult=optimizer["lr_mult"],
                                bias_weight_decay=optimizer["bias_weight_decay"])
    lr_of = {name: g["lr"] for g in groups for name in g["param_names"]}
    modules = dict(model.named_modules())
    for name, lr in lr_of.items():
        if name.startswith("decode_head."):
            assert lr == pytest.approx(10 * 2.5e-4)
            continue
        parts = name.split(".")  # backbone.layerN.block...param
        listings = sum(1 for i in range(2, len(parts)) if ".".join(parts[:i]) in modules) if parts[1] != "conv1" \
            else 1
        expected = sum(sum(0.9 ** j for j in range(k)) for k in range(1, listings + 1))
        assert lr == pytest.approx(2.5e-4 * expected, rel=1e-3), name


def test_deeplab_v2_pipeline_squashes_to_321_then_scales_by_0_5_to_1_3():
    from normkit.data.build import build_train_transform, split_config
    cfg = read_config("deeplab/r101_deeplab_v2_voc")
    transform = build_train_transform(split_config(cfg["data"], "train"))
    image = np.zeros((200, 500, 3), np.uint8)
    image[:, 250:] = 200  # right half bright
    label = np.zeros((200, 500), np.uint8)
    label[:, 250:] = 7
    sizes, flips = set(), 0
    for seed in range(40):
        out_image, out_label = transform(image, label, np.random.default_rng(seed))
        side = out_image.shape[0]
        sizes.add(side)
        assert out_image.shape == (side, side, 3) and out_label.shape == (side, side)  # aspect ratio not kept
        assert int(321 * 0.5) <= side <= int(321 * 1.3)
        assert set(np.unique(out_label)) == {0, 7}  # nearest labels
        flipped = out_label[0, 0] == 7
        flips += flipped
        assert (out_image[0, 0, 0] > 100) == flipped
    assert len(sizes) > 10 and 5 < flips < 35


# -- losses, weight decay, norm momentum -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, ratio", [("condnet/r50d8_cond_sep_aspp_ade20k", 0.75),
                                         ("condnet/r101d8_cond_sep_aspp_pascal_context59", 0.75),
                                         ("csail/r50d8_ppm_deepsup", 1.0), ("sn/r50d8_sn_c1_deepsup", 1.0)])
def test_cross_entropy_average_over_25_percent_ignored_pixels(name, ratio):
    # mmseg 0.x CrossEntropyLoss (avg_non_ignore=False): sum over labelled pixels / all pixels, i.e. 0.75x the
    # mean over labelled pixels when a quarter is ignored; CSAIL's NLLLoss(ignore_index) averages the labelled ones.
    ce_average = read_config(name)["model"]["ce_average"]
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(name="encoder_decoder", loss_mode="upsample_logits", ce_average=ce_average,
                                  decode_head={"name": "c1"},
                                  auxiliary_head={"name": "fcn", "in_index": 2, "channels": 16,
                                                  "dropout": 0.0})).train()
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 4, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255  # 8 of 32 rows: 25% of the pixels
    losses = model({"images": images, "labels": labels})
    features = list(model.backbone(images).values())
    decode = F.interpolate(model.decode_head(features)["logits"], size=(32, 32), mode="bilinear", align_corners=False)
    aux = F.interpolate(model.auxiliary_head(features)["logits"], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["decode_loss"], ratio * F.cross_entropy(decode, labels, ignore_index=255))
    torch.testing.assert_close(losses["aux_loss"], 0.4 * ratio * F.cross_entropy(aux, labels, ignore_index=255))


def _decay_by_kind(name):
    """{(is norm parameter, is bias): set of weight decays} of the optimizer the config builds."""
    from normkit.engine import build_optimizer
    from normkit.nn import is_norm_layer
    from normkit.engine import scale_to_total_batch
    cfg = read_config(name)
    model = build_model(cfg)
    norm_params = {id(p) for m in model.modules() if is_norm_layer(m) for p in m.parameters(recurse=False)}
    decays = {}
    train = scale_to_total_batch(cfg["train"], cfg["train"]["batch_size"] * cfg["train"]["iter_size"])
    for group in build_optimizer(model, train["optimizer"]).param_groups:
        for param, param_name in zip(group["params"], group["param_names"]):
            kind = (id(param) in norm_params, param_name.endswith(".bias"))
            decays.setdefault(kind, set()).add(group["weight_decay"])
    return decays


SEGMENTATION_RECIPES = ["csail/r18d8_c1_deepsup", "csail/r50d8_c1_deepsup", "csail/r50d8_ppm_deepsup",
                        "csail/r101d8_ppm_deepsup", "csail/r50_upernet", "csail/r101_upernet",
                        "sn/r50d8_sn_c1_deepsup", "sn/r50d8_gn_c1_deepsup", "sn/r50d8_syncbn_c1_deepsup",
                        "condnet/r50d8_cond_sep_aspp_ade20k", "condnet/r101d8_cond_sep_aspp_ade20k",
                        "condnet/r101d8_cond_sep_aspp_pascal_context59", "deeplab/r101_deeplab_v2_voc"]


@pytest.mark.parametrize("name", SEGMENTATION_RECIPES)
def test_segmentation_recipes_hold_their_published_batch_in_one_process(name):
    from normkit.engine import scale_to_total_batch
    train = read_config(name)["train"]
    published = 10 if name.startswith("deeplab") else 16  # 8 GPUs x 2 images; the port's iter_size 10 x 1 image
    assert train["optimizer"]["reference_batch"] == published == train["batch_size"] * train["iter_size"]
    one_process = scale_to_total_batch(train, published)
    assert one_process["optimizer"]["lr"] == train["optimizer"]["lr"] and one_process["max_iter"] == train["max_iter"]
    # 8 processes of the same batch: 8 times the images per step, so 8x the lr over an eighth of the steps
    eight = scale_to_total_batch(train, 8 * published)
    assert eight["optimizer"]["lr"] == pytest.approx(8 * train["optimizer"]["lr"])
    assert eight["max_iter"] == round(train["max_iter"] / 8)


@pytest.mark.parametrize("name, decay", [("condnet/r50d8_cond_sep_aspp_ade20k", 5e-4),
                                         ("condnet/r101d8_cond_sep_aspp_pascal_context59", 1e-4)])
def test_condnet_configs_decay_every_parameter_as_mmcv(name, decay):
    decays = _decay_by_kind(name)
    assert set(decays) == {(False, False), (False, True), (True, False), (True, True)}
    assert all(values == {decay} for values in decays.values())


def test_deeplab_v2_decays_every_trainable_parameter_biases_included():
    assert _decay_by_kind("deeplab/r101_deeplab_v2_voc") == {(False, False): {5e-4}, (False, True): {5e-4}}


@pytest.mark.parametrize("name", ["csail/r50d8_ppm_deepsup", "sn/r50d8_sn_c1_deepsup"])
def test_csail_and_sn_seg_configs_decay_conv_weights_only(name):
    decays = _decay_by_kind(name)
    assert decays[(False, False)] == {1e-4}
    assert decays[(True, False)] == decays[(True, True)] == decays.get((False, True), {0.0}) == {0.0}


@pytest.mark.parametrize("name", ["csail/r18d8_c1_deepsup", "csail/r50d8_c1_deepsup", "csail/r50d8_ppm_deepsup",
                                  "csail/r101d8_ppm_deepsup", "csail/r50_upernet", "csail/r101_upernet",
                                  "sn/r50d8_syncbn_c1_deepsup"])
def test_csail_configs_use_the_momentum_of_csail_syncbn(name):
    # CSAIL lib/nn SynchronizedBatchNorm2d(momentum=0.001), in the encoder and the decoders alike (the
    # SwitchNorm_Segmentation fork's SyncBN baseline uses the same module)
    model = build_model(name)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert norms and any(n.startswith("decode_head.") for n, m in model.named_modules() if m in norms)
    assert {m.momentum for m in norms} == {0.001}


# -- Switchable Normalization: ImageNet and segmentation --------------------------------------------------------------
def test_sn_imagenet_config_has_the_resnetv1sn_head_and_the_devkit_momentum():
    from normkit.nn import SwitchNorm2d
    model = build_model("sn/r50_sn_imagenet").eval()
    assert isinstance(model.avgpool, torch.nn.AvgPool2d) and model.avgpool.kernel_size == 7
    assert model.avgpool.stride in (1, (1, 1))
    assert model.dropout.p == 0.5 and model.fc.in_features == 2048 and model.fc.out_features == 1000
    norms = [m for m in model.modules() if isinstance(m, SwitchNorm2d)]
    # devkit SwitchNorm(momentum=0.9): running <- 0.9 running + 0.1 batch
    assert len(norms) == 53 and {m.momentum for m in norms} == {0.1}
    assert all(m.using_moving_average and m.using_bn for m in norms)
    assert all(float(blk.bn3.weight.detach().abs().sum()) == 0
               for stage in model.stages() for blk in stage)  # last_gamma
    # the head: mean over the 7x7 map, no dropout at eval, fc
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.fc(model.forward_features(x)["res5"].mean((2, 3)))
        torch.testing.assert_close(model(x), expected)


def test_sn_segmentation_config_uses_the_fork_momentum():
    from normkit.nn import SwitchNorm2d
    model = build_model("sn/r50d8_sn_c1_deepsup")
    # SwitchNorm_Segmentation's SwitchNorm2d(momentum=0.997): running <- 0.997 running + 0.003 batch
    assert {m.momentum for m in model.modules() if isinstance(m, SwitchNorm2d)} == {0.003}


# -- evaluation and training schedules ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, image, tested", [
    # mmcv imrescale(keep_ratio) to (2048, 512): factor min(2048 / long, 512 / short), size int(x * factor + 0.5)
    ("condnet/r50d8_cond_sep_aspp_ade20k", (600, 800), (512, int(800 * 512 / 600 + 0.5))),
    ("condnet/r101d8_cond_sep_aspp_ade20k", (300, 1500), (int(300 * 2048 / 1500 + 0.5), 2048)),
    # Pascal Context: (520, 520) with keep_ratio: the long side becomes 520
    ("condnet/r101d8_cond_sep_aspp_pascal_context59", (375, 500), (int(375 * 520 / 500 + 0.5), 520)),
    ("condnet/r101d8_cond_sep_aspp_pascal_context59", (500, 333), (520, int(333 * 520 / 500 + 0.5))),
])
def test_condnet_test_pipelines_resize_as_mmseg(name, image, tested):
    from normkit.evaluation.sem_seg import image_sizes
    evaluation = read_config(name)["evaluation"]
    assert image_sizes(evaluation, *image) == [tested]
    if "pascal_context" in name:
        assert (evaluation["mode"], evaluation["crop_size"], evaluation["stride"]) == ("slide", [480, 480], [320, 320])


@pytest.mark.parametrize("name, epochs", [("csail/r18d8_c1_deepsup", 20), ("csail/r50d8_c1_deepsup", 20),
                                          ("csail/r50d8_ppm_deepsup", 20), ("csail/r101d8_ppm_deepsup", 25),
                                          ("csail/r50_upernet", 30), ("csail/r101_upernet", 40),
                                          ("sn/r50d8_sn_c1_deepsup", 20)])
def test_csail_schedules_are_the_original_epochs_of_5000_iterations(name, epochs):
    train = read_config(name)["train"]
    assert train["max_iter"] == epochs * 5000 and train["batch_size"] * train["iter_size"] == 16


@pytest.mark.parametrize("name", ["sn/r50d8_sn_c1_deepsup", "sn/r50d8_gn_c1_deepsup", "sn/r50d8_syncbn_c1_deepsup"])
def test_sn_segmentation_training_short_sides_end_at_575(name):
    assert read_config(name)["data"]["train"]["short_sides"] == [300, 375, 450, 525, 575]


@pytest.mark.parametrize("name, per_gpu", [("sn/r50d8_sn_c1_deepsup", True), ("sn/r50d8_gn_c1_deepsup", True),
                                           ("sn/r50d8_syncbn_c1_deepsup", False), ("csail/r50d8_ppm_deepsup", False)])
def test_unsynchronized_norms_see_the_two_images_of_one_gpu(name, per_gpu):
    # The fork's SN-(8,2) and GN models normalise each GPU's 2 images (DataParallel, no synchronization); its
    # SyncBN model and CSAIL's normalise all 16: one process holds 2 images per micro-batch or all 16.
    train = read_config(name)["train"]
    assert (train["batch_size"], train["iter_size"]) == ((2, 8) if per_gpu else (16, 1))


@pytest.mark.parametrize("name", ["sn/r50d8_sn_c1_deepsup", "sn/r50d8_gn_c1_deepsup", "sn/r50d8_syncbn_c1_deepsup"])
def test_sn_segmentation_trains_on_pil_resizes_and_tests_on_cv2_ones(name):
    # the fork's dataset.py: TrainDataset scipy.misc.imresize (PIL; interp bilinear / nearest), ValDataset cv2.resize
    cfg = read_config(name)
    assert cfg["data"]["train"]["image_resize"] == "pil" and cfg["evaluation"]["image_resize"] == "cv2"


# Optimisation, training-data and test settings written down from the originals: CSAIL config/ade20k-*.yaml
# (TRAIN lr_encoder = lr_decoder 0.02, beta1 0.9, lr_pow 0.9; DATASET imgSizes, imgMaxSize 1000, padding_constant 8,
# 32 for UPerNet), the SwitchNorm_Segmentation fork's train.py (the same, imgSize up to 575), CondNet's
# configs/_base_/schedules/schedule_{80k,160k}.py, datasets/{ade20k,pascal_context_59}.py and its
# headlrx10_lr1e-3 Pascal Context config, and the DeepLab v2 port's evalpyt.py (513 x 513 canvas).
_CSAIL_TRAINING = {"train.optimizer.lr": 0.02, "train.optimizer.momentum": 0.9, "train.lr_schedule.policy": "poly",
                   "train.lr_schedule.power": 0.9, "train.lr_schedule.min_lr": 0.0, "data.train.pipeline": "csail",
                   "data.train.max_long_side": 1000, "data.train.pad_multiple": 8, "data.train.flip": True}
_CSAIL_SHORT_SIDES = {"data.train.short_sides": [300, 375, 450, 525, 600]}
_CONDNET_TRAINING = {"train.optimizer.momentum": 0.9, "train.lr_schedule.policy": "poly",
                     "train.lr_schedule.power": 0.9, "train.lr_schedule.min_lr": 1e-4, "data.train.pipeline": "mmseg",
                     "data.train.ratio_range": [0.5, 2.0], "data.train.cat_max_ratio": 0.75, "data.train.flip": True,
                     "data.train.photometric": True}
_CONDNET_ADE = {**_CONDNET_TRAINING, "train.optimizer.lr": 0.01, "train.max_iter": 160000,
                "data.train.scale": [2048, 512], "data.train.crop_size": [512, 512]}
PUBLISHED_TRAINING = {
    "csail/r18d8_c1_deepsup": {**_CSAIL_TRAINING, **_CSAIL_SHORT_SIDES},
    "csail/r50d8_c1_deepsup": {**_CSAIL_TRAINING, **_CSAIL_SHORT_SIDES},
    "csail/r50d8_ppm_deepsup": {**_CSAIL_TRAINING, **_CSAIL_SHORT_SIDES},
    "csail/r101d8_ppm_deepsup": {**_CSAIL_TRAINING, **_CSAIL_SHORT_SIDES},
    "csail/r50_upernet": {**_CSAIL_TRAINING, **_CSAIL_SHORT_SIDES, "data.train.pad_multiple": 32},
    "csail/r101_upernet": {**_CSAIL_TRAINING, **_CSAIL_SHORT_SIDES, "data.train.pad_multiple": 32},
    "sn/r50d8_sn_c1_deepsup": _CSAIL_TRAINING,
    "sn/r50d8_gn_c1_deepsup": _CSAIL_TRAINING,
    "sn/r50d8_syncbn_c1_deepsup": _CSAIL_TRAINING,
    "condnet/r50d8_cond_sep_aspp_ade20k": _CONDNET_ADE,
    "condnet/r101d8_cond_sep_aspp_ade20k": _CONDNET_ADE,
    "condnet/r101d8_cond_sep_aspp_pascal_context59": {
        **_CONDNET_TRAINING, "train.optimizer.lr": 0.001, "train.max_iter": 80000, "data.train.scale": [520, 520],
        "data.train.crop_size": [480, 480]},
    "deeplab/r101_deeplab_v2_voc": {"evaluation.pad_to": [513, 513], "evaluation.scales": [1.0],
                                    "evaluation.flip": False, "data.train.ratio_range": [0.5, 1.3]},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_TRAINING))
def test_configs_train_and_test_with_the_published_settings(name):
    cfg = read_config(name)
    for path, expected in PUBLISHED_TRAINING[name].items():
        assert _attr(cfg, path) == expected, f"{name}: {path}"


def test_pascal_context_heads_train_at_ten_times_the_lr():
    # CondNet's Pascal Context configs: paramwise_cfg custom_keys {'head': lr_mult 10}, every name holding "head"
    from normkit.engine import build_param_groups
    cfg = read_config("condnet/r101d8_cond_sep_aspp_pascal_context59")
    groups = build_param_groups(build_model(cfg), 1.0, 0.0, lr_mult=cfg["train"]["optimizer"]["lr_mult"])
    mults = {name: group["lr_mult"] for group in groups for name in group["param_names"]}
    assert {name: 10.0 if "head" in name else 1.0 for name in mults} == mults


def test_no_config_without_a_published_model():
    assert not (CONFIGS / "csail" / "r101d8_c1_deepsup.yaml").exists()


# -- pretrained initialisation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEGMENTATION_RECIPES)
def test_published_recipes_name_their_backbone_initialisation(name):
    pretrained = read_config(name)["model"]["backbone"]["pretrained"]
    assert pretrained.startswith("pretrained/") and pretrained.endswith(".pth")


def test_training_refuses_a_named_initialisation_that_is_missing_and_warns_without_one(caplog):
    from normkit.tools.train import check_pretrained
    cfg = read_config("csail/r18d8_c1_deepsup")
    with pytest.raises(FileNotFoundError, match="pretrained/csail_resnet18_imagenet.pth does not exist"):
        check_pretrained(cfg)
    cfg["model"]["backbone"]["pretrained"] = None
    with caplog.at_level("WARNING", logger="normkit.train"):
        check_pretrained(cfg)
    assert "starts from random weights" in caplog.text


def test_a_converted_imagenet_resnet_initialises_the_backbone_strictly(tmp_path, caplog):
    from normkit.convert import convert
    # an mmcv ImageNet ResNetV1c file: stem.{0,1,3,4,6,7}, layerK, fc
    classifier = build_model({"model": {"name": "resnet", "num_classes": 10,
                                        "backbone": {"name": "resnet18", "stem": "v1c", "norm": "bn"}}})
    names = {"conv1": "stem.0", "bn1": "stem.1", "conv2": "stem.3", "bn2": "stem.4", "conv3": "stem.6",
             "bn3": "stem.7"}
    original = {}
    for key, value in classifier.state_dict().items():
        head, rest = key.split(".", 1)
        original[f"{names.get(head, head)}.{rest}"] = value.clone().normal_() if value.is_floating_point() else value
    torch.save({"state_dict": original}, tmp_path / "resnet18_v1c.pth")
    torch.save(convert("mmcv-resnet-v1c", [str(tmp_path / "resnet18_v1c.pth")]), tmp_path / "init.pth")
    cfg = {"model": {"name": "encoder_decoder", "num_classes": 4, "loss_mode": "upsample_logits",
                     "backbone": {"name": "resnet18", "stem": "v1c", "output_stride": 8, "dilation_rule": "mmseg",
                                  "norm": "bn", "pretrained": str(tmp_path / "init.pth")},
                     "decode_head": {"name": "c1"}}}
    with caplog.at_level("INFO", logger="normkit.models"):
        model = build_model(cfg)
    assert "newly initialised: decode_head" in caplog.text
    assert torch.equal(model.backbone.conv2.weight, original["stem.3.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, original["layer4.1.bn2.running_var"])
    # strict: a file that lacks backbone tensors is an error naming them
    partial = {k: v for k, v in torch.load(tmp_path / "init.pth").items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    cfg["model"]["backbone"]["pretrained"] = str(tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="missing keys .*layer4.0.conv1.weight"):
        build_model(cfg)
    # a full checkpoint replaces every weight: the initialisation is not even read
    cfg["model"]["backbone"]["pretrained"] = str(tmp_path / "absent.pth")
    caplog.clear()
    with caplog.at_level("WARNING", logger="normkit.models"):
        build_model(cfg, checkpoint=model.state_dict())
    assert "absent.pth" not in caplog.text
