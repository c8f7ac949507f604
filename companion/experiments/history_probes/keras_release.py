"""``SparseCategoricalCrossentropy`` on one padded example, in whichever
Keras 3 release is importable, on the backend named by ``KERAS_BACKEND``
(``python -m companion.experiments.history_probes.keras_release BACKEND``).

The example: labels ``[[1, 1, 2, 0, 0]]`` (0 = padding), a 0/1 sample
weight on the three real tokens, and predictions that give the true class
probability ``.5, .25, .125`` on the real tokens (``.9`` on the padding), so
that every choice of denominator gives a different number; and uniform
predictions, under which every mean is ``log 5``.
"""

from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import keras  # noqa: E402
import numpy as np  # noqa: E402

LABELS = np.array([[1, 1, 2, 0, 0]])
WEIGHTS = np.array([[1, 1, 1, 0, 0]], dtype="float32")


def predictions() -> dict[str, np.ndarray]:
    true_probability = np.array([0.5, 0.25, 0.125, 0.9, 0.9], dtype="float32")
    rows = np.repeat(((1 - true_probability) / 4)[:, None], 5, axis=1)
    rows[np.arange(5), LABELS[0]] = true_probability
    return {"uniform": np.full((1, 5, 5), 0.2, dtype="float32"),
            "nonuniform": rows[None].astype("float32")}


OPTIONS = {
    "plain": ({}, None),
    "ignore_class": ({"ignore_class": 0}, None),
    "sample_weight": ({}, WEIGHTS),
    "ignore_class+sample_weight": ({"ignore_class": 0}, WEIGHTS),
    "mean_with_sample_weight": ({"reduction": "mean_with_sample_weight"}, WEIGHTS),
}


def main() -> None:
    record = {"keras": keras.__version__, "backend": keras.backend.backend(),
              "requested": sys.argv[1]}
    for name, y_pred in predictions().items():
        record[name] = {}
        for option, (kwargs, weights) in OPTIONS.items():
            try:
                loss = keras.losses.SparseCategoricalCrossentropy(**kwargs)
                value = loss(LABELS, y_pred, sample_weight=weights)
                record[name][option] = float(keras.ops.convert_to_numpy(value))
            except ValueError as error:
                record[name][option] = f"ValueError: {str(error).splitlines()[0][:60]}"
    print(json.dumps(record))


if __name__ == "__main__":
    main()
