"""Companion package of *How Language Models Compute Their Training Loss*.

Two layers.  The library, the modules directly in this package, is what a
reader would copy into a training loop: the causal-LM losses and the count
of scored targets (:mod:`~companion.causal_lm_loss`), the shift and flatten
(:mod:`~companion.shapes`), cross-entropy from scratch
(:mod:`~companion.cross_entropy`), the chunked loss
(:mod:`~companion.chunked_loss`), the loss of a micro-batch under gradient
accumulation and data parallelism (:mod:`~companion.accumulation`), the
fixed Keras loss and corpus metrics (:mod:`~companion.keras_loss`), memory
measurement (:mod:`~companion.memory`) and the float64 references
(:mod:`~companion.reference`).  The book's experiments
(``companion.experiments``) and figures (``companion.plots``) import
the library, never the reverse.

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
