"""Plausible wrong answers to chapter 8's exercises; each must fail its checker."""

import math

import torch

from companion.causal_lm_loss import count_scored_targets, token_losses


# bc-ex1 ---------------------------------------------------------------------
def labels_from_input_ids(batch, eos_token_id):
    """Masks padding by position but starts again from input_ids: prompts scored."""
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def every_eos_id(batch, eos_token_id):
    """Restores every position holding the id, padding included."""
    labels = batch["labels"].clone()
    labels[batch["input_ids"] == eos_token_id] = eos_token_id
    return labels


def last_column(batch, eos_token_id):
    """Assumes each row ends in the last column."""
    labels = batch["labels"].clone()
    labels[:, -1] = eos_token_id
    return labels


def last_real_eos_only(batch, eos_token_id):
    """Restores the end of sequence at each row's last real token only."""
    labels = batch["labels"].clone()
    for b, row in enumerate(batch["attention_mask"]):
        last = int(row.nonzero().max()) if bool(row.any()) else None
        if last is not None and int(batch["input_ids"][b, last]) == eos_token_id:
            labels[b, last] = eos_token_id
    return labels


# bc-ex2 ---------------------------------------------------------------------
def mask_bos(batch):
    """Finds the first real token by its id, <bos> (1)."""
    return batch["labels"].masked_fill(batch["input_ids"] == 1, -100)


def mask_last_padding(batch):
    """Off by one: masks the padding position before the first real token."""
    mask = batch["attention_mask"]
    before = torch.zeros_like(mask, dtype=torch.bool)
    before[:, :-1] = (mask[:, :-1] == 0) & (mask[:, 1:] == 1)
    return batch["labels"].masked_fill(before, -100)


def mask_after_padding_and_padding(batch):
    """Also sets every padding position to -100: labelled padding changes."""
    mask = batch["attention_mask"]
    after_padding = torch.zeros_like(mask, dtype=torch.bool)
    after_padding[:, 1:] = (mask[:, :-1] == 0) & (mask[:, 1:] == 1)
    return batch["labels"].masked_fill(after_padding | (mask == 0), -100)


# bc-ex3 ---------------------------------------------------------------------
class TrainersAttributeName(torch.nn.Module):
    """Sets the Trainer's attribute name, not the model's: nothing changes."""

    def __init__(self, language_model):
        super().__init__()
        self.language_model = language_model
        self.model_accepts_loss_kwargs = True

    def forward(self, input_ids, labels=None, num_items_in_batch=None):
        logits = self.language_model(input_ids)
        if labels is None:
            return {"logits": logits}
        total = token_losses(logits, labels).sum()
        if num_items_in_batch is None:
            num_items_in_batch = count_scored_targets(labels)
        return {"logits": logits, "loss": total / num_items_in_batch}


class KwargsButOwnCount(torch.nn.Module):
    """Takes **kwargs, so the count arrives, but divides by its own count."""

    def __init__(self, language_model):
        super().__init__()
        self.language_model = language_model

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.language_model(input_ids)
        if labels is None:
            return {"logits": logits}
        total = token_losses(logits, labels).sum()
        return {"logits": logits, "loss": total / count_scored_targets(labels)}


# bc-ex4 ---------------------------------------------------------------------
def _split(loss_fn, logits, labels, rows, count):
    total = 0.0
    for start in range(0, labels.shape[0], rows):
        stop = start + rows
        own = count_scored_targets(labels[start:stop]) if count is None else count
        total += float(loss_fn(logits[start:stop], labels[start:stop], num_items_in_batch=max(own, 1)))
    return total


def own_count_per_micro_batch(loss_fn, logits, labels, micro_batch_size):
    """Passes each micro-batch its own count, not the step's."""
    full = float(loss_fn(logits, labels))
    return math.isclose(_split(loss_fn, logits, labels, micro_batch_size, None), full, rel_tol=1e-5)


def count_with_column_zero(loss_fn, logits, labels, micro_batch_size):
    """Counts labels.ne(-100) over every column, the first included."""
    full = float(loss_fn(logits, labels))
    count = int((labels != -100).sum())
    return math.isclose(_split(loss_fn, logits, labels, micro_batch_size, count), full, rel_tol=1e-5)


def exact_equality(loss_fn, logits, labels, micro_batch_size):
    """Compares floats with ==."""
    full = float(loss_fn(logits, labels))
    return _split(loss_fn, logits, labels, micro_batch_size, count_scored_targets(labels)) == full


def nan_passes(loss_fn, logits, labels, micro_batch_size):
    """Fails only when the gap is large: a nan gap is not large."""
    full = float(loss_fn(logits, labels))
    split = _split(loss_fn, logits, labels, micro_batch_size, count_scored_targets(labels))
    return not abs(split - full) > 1e-5 * abs(full)


def equal_micro_batches(loss_fn, logits, labels, micro_batch_size):
    """Reshapes into (K, rows, T): assumes rows divides B."""
    B, T = labels.shape
    count = count_scored_targets(labels)
    pieces = labels.view(B // micro_batch_size, micro_batch_size, T)
    chunks = logits.view(B // micro_batch_size, micro_batch_size, T, -1)
    split = sum(float(loss_fn(x, y, num_items_in_batch=count)) for x, y in zip(chunks, pieces))
    return math.isclose(split, float(loss_fn(logits, labels)), rel_tol=1e-5)


def full_batch_given_the_count(loss_fn, logits, labels, micro_batch_size):
    """Passes the count to the full batch too: a wrong fallback count is never used."""
    count = count_scored_targets(labels)
    full = float(loss_fn(logits, labels, num_items_in_batch=count))
    split = _split(loss_fn, logits, labels, micro_batch_size, count)
    return math.isclose(split, full, rel_tol=1e-5)


WRONG = {
    "bc-ex1": [labels_from_input_ids, every_eos_id, last_column, last_real_eos_only],
    "bc-ex2": [mask_bos, mask_last_padding, mask_after_padding_and_padding],
    "bc-ex3": [TrainersAttributeName, KwargsButOwnCount],
    "bc-ex4": [full_batch_given_the_count, own_count_per_micro_batch, count_with_column_zero, exact_equality, nan_passes,
               equal_micro_batches],
}
