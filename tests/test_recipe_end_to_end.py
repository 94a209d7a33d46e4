"""A converted checkpoint evaluated by tools/test.py with its shipped config predicts what the original model
predicts after the original's own preprocessing.

The original side is test-local: the CSAIL reference model of test_convert.py (written from the CSAIL framework)
and CSAIL's val preprocessing written from its dataset.py (RGB / 255, ImageNet mean and std, short side resized
with the long side capped and both rounded to a multiple of 8, softmax of logits upsampled to the label size).
The original's predictions are written as the label file, so the tool's pixel accuracy must be exactly 1.
"""
import json

import numpy as np
import torch
from PIL import Image

from normkit.convert import convert_csail, save_state_dict
from normkit.tools import test as test_tool
from test_convert import K, CsailC1DeepSup, CsailEncoder, _CsailBasic, _randomize


def csail_preprocess(image: np.ndarray, short_side: int, max_long_side: int = 1000, padding: int = 8):
    """CSAIL ValDataset: resize so the short side is `short_side` (long side <= max_long_side), each side rounded
    to a multiple of `padding`, then RGB / 255 with ImageNet mean and std."""
    h, w = image.shape[:2]
    scale = min(short_side / min(h, w), max_long_side / max(h, w))
    th, tw = (int(((v * scale - 1) // padding + 1) * padding) for v in (h, w))
    resized = np.array(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
    x = np.float32(resized) / 255.0
    x = (x - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
    return torch.from_numpy(x.transpose(2, 0, 1))[None]


def test_csail_checkpoint_through_the_test_tool_predicts_as_the_original(tmp_path):
    torch.manual_seed(0)
    encoder = _randomize(CsailEncoder(_CsailBasic, (2, 2, 2, 2), dilate_scale=8)).eval()
    decoder = _randomize(CsailC1DeepSup(512)).eval()
    torch.save(encoder.state_dict(), tmp_path / "encoder_epoch_20.pth")
    torch.save(decoder.state_dict(), tmp_path / "decoder_epoch_20.pth")
    save_state_dict(convert_csail(tmp_path / "encoder_epoch_20.pth", tmp_path / "decoder_epoch_20.pth"),
                    tmp_path / "converted.pth")

    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    with torch.no_grad():
        probs = decoder(encoder(csail_preprocess(image, short_side=64)), (64, 80))
    prediction = probs.argmax(1)[0].numpy()
    assert len(np.unique(prediction)) > 1

    root = tmp_path / "ade"
    (root / "images").mkdir(parents=True)
    Image.fromarray(image).save(root / "images" / "val_0.png")
    Image.fromarray((prediction + 1).astype(np.uint8)).save(root / "images" / "val_0_seg.png")  # ADE: 0 = other
    (root / "validation.odgt").write_text(json.dumps({"fpath_img": "images/val_0.png",
                                                      "fpath_segm": "images/val_0_seg.png",
                                                      "width": 80, "height": 64}) + "\n")
    results = test_tool.main(["--config", "csail/r18d8_c1_deepsup", "--checkpoint", str(tmp_path / "converted.pth"),
                              "--set", f"data.root={root}", f"model.num_classes={K}", f"data.num_classes={K}",
                              "train.device=cpu"])
    assert results["pixel_acc"] == 1.0
