"""The README's "engine with your own model" example runs as written and learns."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_custom_model_example_trains():
    text = README.read_text()
    match = re.search(r"```python\n(import torch\nfrom torch import nn\nfrom normkit\.engine.*?)```", text, re.S)
    assert match, "the README lost its custom-model engine example"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    # y = sum(x) with x ~ N(0, I_4) has variance 4; the trained regressor must be far better than predicting 0
    assert namespace["trainer"].scalars["mse_loss"] < 0.5
