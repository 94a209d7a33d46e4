"""Command-line tools and the assembly they share: config -> model, data, trainer, evaluation.

`tools/*.py` in a checkout are thin wrappers over these modules."""
