"""Backbones: ResNet 18/34/50/101 with v1/deep/v1c stems, dilation and any norm."""
from normkit.models.backbones.resnet import ResNet, BasicBlock, Bottleneck  # noqa: F401
