"""A converted checkpoint evaluated by tools/test.py with its shipped config predicts what the original model
predicts after the original's own preprocessing, for each segmentation family.

The original side is test-local, written from each original's code structure and formulas, never from normkit's
models: the CSAIL reference model of test_convert.py and CSAIL's val preprocessing (dataset.py); the
SwitchNorm_Segmentation encoder/decoder with its SwitchNorm2d (docs/design.md formulas) and its BGR ValDataset;
the DeepLab v2 port's MS_Deeplab and its evalpyt.py (513 x 513 zero canvas, here a smaller one); CondNet's mmseg
ResNetV1c + CondDepthwiseSeparableASPPHead + FCN head and mmseg's keep-ratio test pipeline. Random weights are
saved in the original checkpoint layout and converted with normkit's converter. The original's predictions are
written as the label file, so the tool's pixel accuracy must be exactly 1. Test images are small (and the test
sizes overridden to suit them) so that every family runs in seconds; the CSAIL, SN-seg and CondNet cases also test
at sizes that shrink and enlarge the image, averaged over scales (and, for mmseg, flips) as the originals do.
"""
import json
from functools import partial

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from normkit.convert import convert_csail, convert_deeplab_v2, convert_mmseg, save_state_dict
from normkit.models import read_config
from normkit.evaluation.sem_seg import image_sizes
from normkit.tools import test as test_tool
from test_convert import K, CsailC1DeepSup, CsailEncoder, _CsailBasic, _nostride_dilate, _randomize


def round_up(x: int, p: int) -> int:
    """CSAIL's round2nearest_multiple."""
    return ((x - 1) // p + 1) * p


def write_ade_odgt(root, image: np.ndarray, prediction: np.ndarray) -> None:
    """A one-image ADE20K .odgt val set whose label is `prediction` (ADE labels: 0 = other, class k is k + 1)."""
    (root / "images").mkdir(parents=True)
    Image.fromarray(image).save(root / "images" / "val_0.png")
    Image.fromarray((prediction + 1).astype(np.uint8)).save(root / "images" / "val_0_seg.png")
    (root / "validation.odgt").write_text(json.dumps({"fpath_img": "images/val_0.png",
                                                      "fpath_segm": "images/val_0_seg.png",
                                                      "width": image.shape[1], "height": image.shape[0]}) + "\n")


def saved_jpeg(path, image: np.ndarray) -> np.ndarray:
    """Write `image` as the JPEG file a config's dataset layout expects; the decoded pixels both sides read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=95)
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def pixel_acc_through_the_test_tool(config: str, checkpoint, root, *overrides: str) -> float:
    results = test_tool.main(["--config", config, "--checkpoint", str(checkpoint),
                              "--set", f"data.root={root}", f"model.num_classes={K}", f"data.num_classes={K}",
                              "train.device=cpu", *overrides])
    return results["pixel_acc"]


def csail_preprocess(image: np.ndarray, short_side: int, max_long_side: int = 1000, padding: int = 8):
    """CSAIL ValDataset: resize so the short side is `short_side` (long side <= max_long_side), each side int()
    then rounded up to a multiple of `padding`, then RGB / 255 with ImageNet mean and std."""
    h, w = image.shape[:2]
    scale = min(short_side / min(h, w), max_long_side / max(h, w))
    th, tw = (round_up(int(v * scale), padding) for v in (h, w))
    resized = np.array(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
    x = np.float32(resized) / 255.0
    x = (x - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    return torch.from_numpy(x.transpose(2, 0, 1))[None]


def multi_size_prediction(encoder, decoder, preprocess, image: np.ndarray, short_sides) -> np.ndarray:
    """CSAIL's (and the fork's) eval loop: the decoder's softmax at the label size for every resized input,
    averaged over the short sides (pred += pred_tmp / len(imgSizes)), argmax."""
    seg_size = image.shape[:2]
    with torch.no_grad():
        scores = sum(decoder(encoder(preprocess(image, short_side=s)), seg_size) / len(short_sides)
                     for s in short_sides)
    return scores.argmax(1)[0].numpy()


# short side 64 keeps this 64 x 80 image's size; 48 shrinks it to 48 x 60 -> 48 x 64 and 72 enlarges it to 72 x 90 ->
# 72 x 96 (multiples of 8), so both the image resize and the logits' one-step resize to the label size matter
@pytest.mark.parametrize("short_sides", [[64], [48, 72]])
def test_csail_checkpoint_through_the_test_tool_predicts_as_the_original(tmp_path, short_sides):
    torch.manual_seed(0)
    encoder = _randomize(CsailEncoder(_CsailBasic, (2, 2, 2, 2), dilate_scale=8)).eval()
    decoder = _randomize(CsailC1DeepSup(512)).eval()
    torch.save(encoder.state_dict(), tmp_path / "encoder_epoch_20.pth")
    torch.save(decoder.state_dict(), tmp_path / "decoder_epoch_20.pth")
    save_state_dict(convert_csail(tmp_path / "encoder_epoch_20.pth", tmp_path / "decoder_epoch_20.pth"),
                    tmp_path / "converted.pth")

    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    prediction = multi_size_prediction(encoder, decoder, csail_preprocess, image, short_sides)
    assert len(np.unique(prediction)) > 1

    root = tmp_path / "ade"
    write_ade_odgt(root, image, prediction)
    # the config tests at short side 450 (multiple of 8); short sides near this image's keep the test fast
    assert pixel_acc_through_the_test_tool("csail/r18d8_c1_deepsup", tmp_path / "converted.pth", root,
                                           f"evaluation.short_sides={short_sides}") == 1.0


# ---------------------------------------------------------------------------------------------------------
# SwitchNorm_Segmentation: ResNet50_dilated8 with the 7x7 stem and SwitchNorm2d everywhere + c1_bilinear_deepsup.

class OfficialSwitchNorm2d(nn.Module):
    """The fork's SwitchNorm2d in eval mode: IN statistics (unbiased variance), LN from them, BN from the running
    buffers, mixed by softmax weights [IN, LN, BN]; weight/bias (1, C, 1, 1), running stats (1, C, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, channels, 1))
        self.register_buffer("running_var", torch.zeros(1, channels, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, -1)
        mean_in, var_in = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean_ln ** 2
        mw, vw = F.softmax(self.mean_weight, 0), F.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * self.running_mean
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * self.running_var
        return ((x - mean) / (var + 1e-5).sqrt()).view(n, c, h, w) * self.weight + self.bias


class _SnBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.sn1 = nn.Conv2d(inplanes, planes, 1, bias=False), OfficialSwitchNorm2d(planes)
        self.conv2, self.sn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), OfficialSwitchNorm2d(planes)
        self.conv3, self.sn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), OfficialSwitchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.sn1(self.conv1(x)))
        out = F.relu(self.sn2(self.conv2(out)))
        return F.relu(self.sn3(self.conv3(out)) + residual)


class SnEncoder(nn.Module):
    """ResNetV1SN-50 (7x7 stem, stride in the 3x3 conv) dilated to stride 8 by ResnetDilated._nostride_dilate."""

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.sn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), OfficialSwitchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            setattr(self, f"layer{i + 1}", self._make_layer(planes, n, 1 if i == 0 else 2))
        self.layer3.apply(partial(_nostride_dilate, dilate=2))
        self.layer4.apply(partial(_nostride_dilate, dilate=4))

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                       OfficialSwitchNorm2d(planes * 4))
        layers = [_SnBottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [_SnBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(F.relu(self.sn1(self.conv1(x))))
        out = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out


def _conv3x3_sn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), OfficialSwitchNorm2d(cout), nn.ReLU())


class SnC1BilinearDeepSup(nn.Module):
    def __init__(self, fc_dim=2048):
        super().__init__()
        self.cbr, self.cbr_deepsup = _conv3x3_sn_relu(fc_dim, fc_dim // 4), _conv3x3_sn_relu(fc_dim // 2, fc_dim // 4)
        self.conv_last, self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, K, 1), nn.Conv2d(fc_dim // 4, K, 1)

    def forward(self, conv_out, seg_size):  # use_softmax=True (inference)
        x = self.conv_last(self.cbr(conv_out[-1]))
        return F.softmax(F.interpolate(x, size=seg_size, mode="bilinear", align_corners=False), dim=1)


def _randomize_sn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, OfficialSwitchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.mean_weight.normal_(0, 1)
                m.var_weight.normal_(0, 1)
    return model


def sn_seg_preprocess(image: np.ndarray, short_side: int, max_long_side: int = 1000, padding: int = 8):
    """SwitchNorm_Segmentation's ValDataset: channels reversed to BGR, sizes int() then rounded up to a multiple of
    `padding`, cv2.resize, float 0..255 minus [102.9801, 115.9465, 122.7717] (std 1)."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    h, w = bgr.shape[:2]
    scale = min(short_side / float(min(h, w)), max_long_side / float(max(h, w)))
    th, tw = round_up(int(h * scale), padding), round_up(int(w * scale), padding)
    x = torch.from_numpy(cv2.resize(bgr, (tw, th)).astype(np.float32).transpose(2, 0, 1))
    x = x - torch.tensor([102.9801, 115.9465, 122.7717]).view(3, 1, 1)
    return x[None]


@pytest.mark.parametrize("short_sides", [[64], [48, 72]])
def test_sn_seg_checkpoint_through_the_test_tool_predicts_as_the_original(tmp_path, short_sides):
    torch.manual_seed(0)
    encoder, decoder = _randomize_sn(SnEncoder()).eval(), _randomize_sn(SnC1BilinearDeepSup()).eval()
    torch.save(encoder.state_dict(), tmp_path / "encoder_epoch_20.pth")
    torch.save(decoder.state_dict(), tmp_path / "decoder_epoch_20.pth")
    save_state_dict(convert_csail(tmp_path / "encoder_epoch_20.pth", tmp_path / "decoder_epoch_20.pth"),
                    tmp_path / "converted.pth")

    image = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    prediction = multi_size_prediction(encoder, decoder, sn_seg_preprocess, image, short_sides)
    assert len(np.unique(prediction)) > 1

    root = tmp_path / "ade"
    write_ade_odgt(root, image, prediction)
    assert pixel_acc_through_the_test_tool("sn/r50d8_sn_c1_deepsup", tmp_path / "converted.pth", root,
                                           f"evaluation.short_sides={short_sides}") == 1.0


# ---------------------------------------------------------------------------------------------------------
# DeepLab v2, the pytorch-deeplab-resnet port: MS_Deeplab(Bottleneck) with frozen BN, evaluated as evalpyt.py.

class _PortBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)  # stride here
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + residual)


class _PortClassifier(nn.Module):
    def __init__(self, dilations=(6, 12, 18, 24)):
        super().__init__()
        self.conv2d_list = nn.ModuleList(nn.Conv2d(2048, K, 3, 1, padding=d, dilation=d, bias=True) for d in dilations)

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
        return out


class _PortResNet(nn.Module):
    def __init__(self, layers=(3, 4, 23, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.inplanes = 64
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], dilation=2)
        self.layer4 = self._make_layer(512, layers[3], dilation=4)
        self.layer5 = _PortClassifier()

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
        layers = [_PortBottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        layers += [_PortBottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


def _port_out_size(i: int) -> int:
    """The port's outS (Python 2 integer division)."""
    i = (i + 1) // 2
    i = int(np.ceil((i + 1) / 2.0))
    return (i + 1) // 2


def _upsampling_bilinear(x, size):  # nn.UpsamplingBilinear2d
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class PortMSDeepLab(nn.Module):
    """MS_Deeplab: square inputs (the height decides every size), scales 1, int(0.75 H) + 1, int(0.5 H) + 1, the
    smaller outputs resized to outS(H), element-wise max of the three as the fourth output."""

    def __init__(self):
        super().__init__()
        self.Scale = _PortResNet()

    def forward(self, x):
        size = x.shape[2]
        out_size = (_port_out_size(size),) * 2
        x75 = _upsampling_bilinear(x, (int(size * 0.75) + 1,) * 2)
        x50 = _upsampling_bilinear(x, (int(size * 0.5) + 1,) * 2)
        out = [self.Scale(x), _upsampling_bilinear(self.Scale(x75), out_size), self.Scale(x50)]
        fused = torch.max(torch.max(out[0], out[1]), _upsampling_bilinear(out[2], out_size))
        return out + [fused]


def deeplab_port_predict(model, image: np.ndarray, canvas: int) -> np.ndarray:
    """evalpyt.py: cv2 BGR as float64 minus the port's means, placed in a canvas x canvas zero image, output[3]
    upsampled to the canvas (UpsamplingBilinear2d), cropped to the image, argmax over classes."""
    img = image[:, :, ::-1].astype(float)
    img = img - np.array([104.008, 116.669, 122.675])
    padded = np.zeros((canvas, canvas, 3))
    padded[:img.shape[0], :img.shape[1], :] = img
    with torch.no_grad():
        output = model(torch.from_numpy(padded[np.newaxis].transpose(0, 3, 1, 2)).float())
        output = _upsampling_bilinear(output[3], (canvas, canvas))[0].numpy()
    return output[:, :img.shape[0], :img.shape[1]].argmax(0)


def test_deeplab_v2_checkpoint_through_the_test_tool_predicts_as_the_port(tmp_path):
    torch.manual_seed(0)
    model = _randomize(PortMSDeepLab()).eval()
    # the port's files come from an older torch: no num_batches_tracked
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "MS_DeepLab_resnet_trained_VOC.pth")
    save_state_dict(convert_deeplab_v2(tmp_path / "MS_DeepLab_resnet_trained_VOC.pth"), tmp_path / "converted.pth")

    root = tmp_path / "VOC2012"
    image = saved_jpeg(root / "JPEGImages" / "val_0.jpg",
                       np.random.default_rng(2).integers(0, 256, (49, 60, 3), dtype=np.uint8))
    # a 65 x 65 canvas instead of 513 x 513 keeps ResNet-101 at three scales fast; 65 = 8 * 8 + 1 like 513
    prediction = deeplab_port_predict(model, image, canvas=65)
    assert len(np.unique(prediction)) > 1
    (root / "SegmentationClass").mkdir()
    Image.fromarray(prediction.astype(np.uint8)).save(root / "SegmentationClass" / "val_0.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("val_0\n")
    assert pixel_acc_through_the_test_tool("deeplab/r101_deeplab_v2_voc", tmp_path / "converted.pth", root,
                                           "evaluation.pad_to=[65,65]") == 1.0


# ---------------------------------------------------------------------------------------------------------
# CondNet (mmseg 0.x): ResNetV1c-50-D8 + CondDepthwiseSeparableASPPHead + FCN auxiliary head, mmseg whole inference.

class ConvModule(nn.Module):
    """mmcv ConvModule: conv (bias only without a norm) [+ BN] [+ ReLU], keys conv.* and bn.*."""

    def __init__(self, cin, cout, k, *, stride=1, padding=0, dilation=1, groups=1, norm=True, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else None
        self.act = act

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x) if self.bn is not None else x
        return F.relu(x) if self.act else x


class DepthwiseSeparableConvModule(nn.Module):
    def __init__(self, cin, cout, k, *, padding=0, dilation=1):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, k, padding=padding, dilation=dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class _MMSegBottleneck(nn.Module):
    """style='pytorch': the stride in the 3x3 conv, padding = dilation."""

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNetV1c(nn.Module):
    """mmseg ResNetV1c-50: deep stem 32/32/64, strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation
    (the first block of a dilated stage uses half the dilation)."""

    def __init__(self, layers=(3, 4, 6, 3)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (n, stride, dilation) in enumerate(zip(layers, (1, 2, 1, 1), (1, 1, 2, 4))):
            planes = 64 * 2 ** i
            downsample = None
            if stride != 1 or inplanes != planes * 4:
                downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                           nn.BatchNorm2d(planes * 4))
            first_dilation = dilation // 2 if dilation > 1 else dilation
            blocks = [_MMSegBottleneck(inplanes, planes, stride, first_dilation, downsample)]
            inplanes = planes * 4
            blocks += [_MMSegBottleneck(inplanes, planes, 1, dilation) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = self.maxpool(self.stem(x))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs


def _resize(x, size):  # mmseg.ops.resize with align_corners=False
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class CondDepthwiseSeparableASPPHead(nn.Module):
    """CondNet's head (eval mode): DeepLabV3+ ASPP with image pooling and the stage-1 skip, then the conditional
    classifier (ConditionalDecodeHead.cls_seg, one conditional layer with bias)."""

    def __init__(self, in_channels=2048, channels=512, dilations=(1, 12, 24, 36), c1_in_channels=256,
                 c1_channels=48):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_channels, channels, 1) if d == 1 else
            DepthwiseSeparableConvModule(in_channels, channels, 3, padding=d, dilation=d) for d in dilations)
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1)
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(DepthwiseSeparableConvModule(channels + c1_channels, channels, 3,
                                                                         padding=1),
                                            DepthwiseSeparableConvModule(channels, channels, 3, padding=1))
        self.guidance_project = ConvModule(channels, K, 1, norm=False, act=False)
        self.filter_project = ConvModule(channels * K, channels * K + K, 1, groups=K, norm=False, act=False)
        self.dropout = nn.Dropout2d(0.1)
        self.channels = channels

    def forward(self, inputs):
        x = inputs[3]
        aspp = [_resize(self.image_pool(x), x.shape[2:])] + [m(x) for m in self.aspp_modules]
        output = self.bottleneck(torch.cat(aspp, dim=1))
        c1 = self.c1_bottleneck(inputs[0])
        output = self.sep_bottleneck(torch.cat([_resize(output, c1.shape[2:]), c1], dim=1))
        return self.cls_seg(output)

    def cls_seg(self, feat):
        feat = self.dropout(feat)
        guidance = F.softmax(self.guidance_project(feat), dim=1)
        guidance = guidance.reshape(*guidance.shape[:2], -1)
        key = feat.reshape(*feat.shape[:2], -1).permute(0, 2, 1).contiguous()
        cond_filters = ((feat.shape[2] * feat.shape[3]) ** -1) * torch.matmul(guidance, key)
        cond_filters = self.filter_project(cond_filters.reshape(cond_filters.shape[0], -1, 1, 1))
        cond_filters = cond_filters.reshape(cond_filters.shape[0], -1)
        batch_size, _, h, w = feat.shape
        weight, bias = torch.split(cond_filters, [self.channels * K, K], dim=1)
        weight = weight.reshape(batch_size * K, -1, 1, 1)
        bias = bias.reshape(batch_size * K)
        value = feat.reshape(-1, h, w).unsqueeze(0)
        return F.conv2d(value, weight, bias=bias, groups=batch_size).view(batch_size, K, h, w)


class FCNHead(nn.Module):
    def __init__(self, in_channels=1024, channels=256):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        self.conv_seg = nn.Conv2d(channels, K, 1)


class CondNetR50(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = ResNetV1c()
        self.decode_head = CondDepthwiseSeparableASPPHead()
        self.auxiliary_head = FCNHead()  # training only; its weights are part of the checkpoint

    def whole_inference(self, img, ori_shape):
        """EncoderDecoder.encode_decode (logits resized to the input) + whole_inference(rescale=True) + softmax."""
        logits = _resize(self.decode_head(self.backbone(img)), img.shape[2:])
        return F.softmax(_resize(logits, ori_shape), dim=1)


def mmseg_test_pipeline(image: np.ndarray, img_scale=(2048, 512), flip: bool = False):
    """LoadImageFromFile (cv2, BGR), Resize(keep_ratio=True) via mmcv.imrescale (cv2 bilinear, sizes
    int(x * factor + 0.5)), RandomFlip (mmcv.imflip, horizontal), Normalize(mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375], to_rgb=True) as mmcv.imnormalize: BGR -> RGB, minus the mean, times 1 / std."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    h, w = bgr.shape[:2]
    factor = min(max(img_scale) / max(h, w), min(img_scale) / min(h, w))
    resized = cv2.resize(bgr, (int(w * factor + 0.5), int(h * factor + 0.5)), interpolation=cv2.INTER_LINEAR)
    if flip:
        resized = np.ascontiguousarray(np.flip(resized, axis=1))
    img = cv2.cvtColor(resized.astype(np.float32), cv2.COLOR_BGR2RGB)
    mean = np.float64([123.675, 116.28, 103.53]).reshape(1, -1)
    stdinv = 1 / np.float64([58.395, 57.12, 57.375]).reshape(1, -1)
    img = cv2.multiply(cv2.subtract(img, mean), stdinv)
    return torch.from_numpy(img.transpose(2, 0, 1).copy())[None]


def mmseg_aug_test(model, image: np.ndarray, img_scales, flip: bool) -> np.ndarray:
    """EncoderDecoder.aug_test over MultiScaleFlipAug's inputs: each (scale, flip) view's inference() (whole
    inference + softmax, the flipped view's probabilities flipped back) summed and divided by their number."""
    views = [(scale, mirrored) for scale in img_scales for mirrored in ((False, True) if flip else (False,))]
    total = 0
    with torch.no_grad():
        for scale, mirrored in views:
            probs = model.whole_inference(mmseg_test_pipeline(image, scale, mirrored), image.shape[:2])
            total = total + (probs.flip(3) if mirrored else probs)
    return (total / len(views)).argmax(1)[0].numpy()


# img_scale (256, 64) keeps this 64 x 80 image's size (the config's (2048, 512) scaled down by 8); (256, 48) and
# (256, 96) shrink it to 48 x 60 and enlarge it to 96 x 120, averaged over both and over flips
@pytest.mark.parametrize("img_scales, flip", [([(256, 64)], False), ([(256, 48), (256, 96)], True)])
def test_condnet_checkpoint_through_the_test_tool_predicts_as_mmseg(tmp_path, img_scales, flip):
    torch.manual_seed(0)
    model = _randomize(CondNetR50()).eval()
    torch.save({"meta": {"iter": 160000}, "state_dict": model.state_dict()}, tmp_path / "condnet.pth")
    save_state_dict(convert_mmseg(tmp_path / "condnet.pth"), tmp_path / "converted.pth")

    root = tmp_path / "ADEChallengeData2016"
    image = saved_jpeg(root / "images" / "validation" / "val_0.jpg",
                       np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    prediction = mmseg_aug_test(model, image, img_scales, flip)
    assert len(np.unique(prediction)) > 1
    (root / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray((prediction + 1).astype(np.uint8)).save(root / "annotations" / "validation" / "val_0.png")
    # each img_scale's short side decides its size here, so short_sides with the one long-side cap express them
    short_sides = [min(scale) for scale in img_scales]
    assert pixel_acc_through_the_test_tool("condnet/r50d8_cond_sep_aspp_ade20k", tmp_path / "converted.pth",
                                           tmp_path, f"evaluation.short_sides={short_sides}",
                                           "evaluation.max_long_side=256", f"evaluation.flip={str(flip).lower()}"
                                           ) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Test sizes of the published CSAIL-framework configs: the sizes the originals' ValDatasets feed their networks.

@pytest.mark.parametrize("config, preprocess, padding", [
    ("csail/r18d8_c1_deepsup", csail_preprocess, 8), ("csail/r50d8_ppm_deepsup", csail_preprocess, 8),
    ("csail/r101d8_ppm_deepsup", csail_preprocess, 8), ("csail/r50_upernet", csail_preprocess, 32),
    ("csail/r101_upernet", csail_preprocess, 32), ("sn/r50d8_sn_c1_deepsup", sn_seg_preprocess, 8),
])
@pytest.mark.parametrize("height, width", [(375, 500), (333, 500), (512, 683), (1200, 300), (97, 101)])
def test_csail_family_configs_test_at_the_original_sizes(config, preprocess, padding, height, width):
    evaluation = read_config(config)["evaluation"]
    image = np.zeros((height, width, 3), np.uint8)
    # the single-scale setting of the eval.py that produced the published numbers: --imgSize 450, --imgMaxSize 1000
    original = tuple(preprocess(image, short_side=450, max_long_side=1000, padding=padding).shape[-2:])
    assert image_sizes(evaluation, height, width) == [original]
