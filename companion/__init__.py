"""Companion package of *How Language Models Compute Their Training Loss*.

Importing :mod:`companion` first quietens TensorFlow's C++ logging: the two
variables below are read once, when TensorFlow is first imported, so they
must be set before any ``import tensorflow``.  It also silences tqdm's
missing-widgets warning.  The book's notebooks import ``companion`` in their
first cell for these reasons.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# transformers imports tqdm.auto, which warns inside a notebook kernel that
# ipywidgets is missing and it cannot draw progress widgets.  Nothing in the
# book shows a progress bar, so the warning would only be noise on stderr.
warnings.filterwarnings("ignore", message="IProgress not found")

IGNORE_INDEX: int = -100
"""Label value that PyTorch's and Hugging Face's losses skip (``ignore_index``)."""

__version__ = "0.1.0"

__all__ = ["IGNORE_INDEX", "__version__"]
