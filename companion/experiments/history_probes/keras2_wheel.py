"""Keras 2.x's ``keras/utils/losses_utils.py``, read from the release's wheel
and executed on the pinned tf-keras (the same code line, renamed), where it
has ``apply_valid_mask``
(``python -m companion.experiments.history_probes.keras2_wheel WHEEL``).

Keras 2.9-2.11 need TensorFlow 2.9-2.11, which has no wheels for Python
3.11, so the release cannot be imported; its own functions can still run:
the wheel's module source is compiled with its ``keras.`` imports pointed at
``tf_keras.src.``.  The per-token losses come from tf-keras's backend with
``ignore_class=0``; the wheel's ``apply_valid_mask`` and
``compute_weighted_loss`` do the rest.
"""

from __future__ import annotations

import json
import re
import sys
import types
import warnings
import zipfile

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402, F401  (registers tf_keras.src)
from tf_keras.src import backend  # noqa: E402

from companion.experiments.history_probes.keras_release import (  # noqa: E402
    LABELS,
    WEIGHTS,
    predictions,
)

PATH = "keras/utils/losses_utils.py"


def wheel_module(wheel: str) -> types.ModuleType:
    source = zipfile.ZipFile(wheel).read(PATH).decode()
    source = re.sub(r"^from keras(\.| )", lambda m: "from tf_keras.src" + m.group(1), source,
                    flags=re.M)
    source = re.sub(r"^import keras", "import tf_keras.src", source, flags=re.M)
    # keras_export would register the names a second time: make it a no-op
    source = source.replace("@keras_export(", "@(lambda *a, **k: (lambda f: f))(")
    module = types.ModuleType("wheel_losses_utils")
    exec(compile(source, f"{wheel}!{PATH}", "exec"), module.__dict__)  # noqa: S102
    return module


def main() -> None:
    wheel = sys.argv[1]
    module = wheel_module(wheel)
    version = re.search(r"keras-([0-9.]+)-", wheel).group(1)
    record = {"keras": version,
              "functions": [n for n in ("apply_valid_mask", "get_mask") if hasattr(module, n)]}
    if hasattr(module, "apply_valid_mask"):
        reduction = module.ReductionV2.SUM_OVER_BATCH_SIZE
        for name, y_pred in predictions().items():
            losses = backend.sparse_categorical_crossentropy(
                tf.constant(LABELS), tf.constant(y_pred), ignore_class=0)
            mask = module.get_mask(losses)
            record[name] = {}
            for option, weights in (("ignore_class", None),
                                    ("ignore_class+sample_weight", tf.constant(WEIGHTS))):
                weights = module.apply_valid_mask(losses, weights, mask, reduction)
                record[name][option] = float(
                    module.compute_weighted_loss(losses, weights, reduction=reduction))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
