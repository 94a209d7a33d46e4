"""Segmentation datasets (ADE20K, VOC, Pascal Context), training/validation pipelines and loaders, and the
synthetic mini ADE20K-layout set. The `data:` config schema is documented in `normkit.data.build`."""
from normkit.data.ade20k import ADE20K_CLASSES, ADE20KDataset
from normkit.data.base import IGNORE_INDEX, SegmentationDataset
from normkit.data.build import build_dataset, build_train_loader, build_val_loader
from normkit.data.pascal_context import PASCAL_CONTEXT59_CLASSES, PascalContextDataset
from normkit.data.synthetic import MINI_ADE_CLASSES, generate_mini_ade
from normkit.data.voc import VOC_CLASSES, VOCDataset

__all__ = ["ADE20K_CLASSES", "ADE20KDataset", "IGNORE_INDEX", "MINI_ADE_CLASSES", "PASCAL_CONTEXT59_CLASSES",
           "PascalContextDataset", "SegmentationDataset", "VOC_CLASSES", "VOCDataset", "build_dataset",
           "build_train_loader", "build_val_loader", "generate_mini_ade"]
