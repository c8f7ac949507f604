"""Plausible wrong answers to chapter 4's exercises; each must fail its checker."""

import numpy as np


def real_token_loss_reduction_mean(labels, probabilities):
    import keras

    # "mean" is another name of the default sum_over_batch_size: still divides by B*T
    loss = keras.losses.SparseCategoricalCrossentropy(reduction="mean")
    weights = (labels != 0).astype("float32")
    return float(loss(labels, probabilities, sample_weight=weights))


def real_token_loss_per_sequence(labels, probabilities):
    import keras

    # the summed loss divided by the number of sequences, not of real tokens
    loss = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    weights = (labels != 0).astype("float32")
    return float(loss(labels, probabilities, sample_weight=weights)) / len(labels)


def build_toy_custom_layer(token_logits):
    import keras

    class Scale(keras.layers.Layer):  # rewritten as a layer, still without supports_masking
        def call(self, t):
            return t * 1.0

    num_tokens, num_classes = token_logits.shape
    inputs = keras.Input(shape=(None,), dtype="int32")
    embedding = keras.layers.Embedding(num_tokens, num_classes, mask_zero=True)
    dense = keras.layers.Dense(num_classes, activation="softmax")
    model = keras.Model(inputs, dense(Scale()(embedding(inputs))))
    embedding.set_weights([np.asarray(token_logits, "float32")])
    dense.set_weights([np.eye(num_classes, dtype="float32"), np.zeros(num_classes, "float32")])
    model.compile(loss="sparse_categorical_crossentropy")
    return model


def build_toy_ignore_class(token_logits):
    """Keeps the buggy Lambda; the loss is told that class 0 is padding instead."""
    import keras

    num_tokens, num_classes = token_logits.shape
    inputs = keras.Input(shape=(None,), dtype="int32")
    embedding = keras.layers.Embedding(num_tokens, num_classes, mask_zero=True)
    scale = keras.layers.Lambda(lambda t: t * 1.0)
    dense = keras.layers.Dense(num_classes, activation="softmax")
    model = keras.Model(inputs, dense(scale(embedding(inputs))))
    embedding.set_weights([np.asarray(token_logits, "float32")])
    dense.set_weights([np.eye(num_classes, dtype="float32"), np.zeros(num_classes, "float32")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=0))
    return model


def _weights(nll, sample_weight, mask):
    weight = np.ones_like(nll) if sample_weight is None else np.asarray(sample_weight, float)
    return weight if mask is None else weight * mask


def reduction_as_before_keras_2_11(nll, sample_weight, mask, reduction):
    # the mask multiplies the weights but nothing rescales it
    weight = _weights(nll, sample_weight, mask)
    total = float((weight * nll).sum())
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and weight.sum() > 0:
        return total / weight.sum()
    return total / nll.size


def reduction_always_by_the_weights(nll, sample_weight, mask, reduction):
    # believes the rescaled mask makes both means divide by the weights
    weight = _weights(nll, sample_weight, mask)
    total = float((weight * nll).sum())
    if reduction == "sum":
        return total
    return total / weight.sum() if weight.sum() > 0 else 0.0


def reduction_nan_when_empty(nll, sample_weight, mask, reduction):
    # right, except that 0/0 is left to NumPy
    weight = np.ones_like(nll) if sample_weight is None else np.asarray(sample_weight, float)
    if mask is not None:
        mask = np.asarray(mask, float)
        if reduction == "sum_over_batch_size":
            with np.errstate(invalid="ignore", divide="ignore"):
                mask = mask * (mask.size / mask.sum())
        weight = weight * mask
    total = float(np.nansum(weight * nll)) if reduction == "sum" else float((weight * nll).sum())
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and (sample_weight is not None or mask is not None):
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.float64(total) / weight.sum())
    return total / nll.size


def reduction_rescaled_for_every_reduction(nll, sample_weight, mask, reduction):
    """Applies apply_mask's BT / sum(m) rescaling under "sum" too."""
    weight = np.ones_like(nll) if sample_weight is None else np.asarray(sample_weight, float)
    if mask is not None:
        m = np.asarray(mask, float)
        weight = weight * m * (m.size / m.sum() if m.sum() else 0.0)
    total = float((weight * nll).sum())
    if reduction == "sum":
        return total
    divisor = weight.sum() if reduction == "mean_with_sample_weight" else nll.size
    return total / divisor if divisor else 0.0


WRONG = {
    "keras-masking-ex1": [real_token_loss_reduction_mean, real_token_loss_per_sequence],
    "keras-masking-ex2": [build_toy_custom_layer, build_toy_ignore_class],
    "keras-masking-ex3": [reduction_rescaled_for_every_reduction, 
        reduction_as_before_keras_2_11,
        reduction_always_by_the_weights,
        reduction_nan_when_empty,
    ],
}
