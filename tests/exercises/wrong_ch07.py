"""Plausible wrong answers to chapter 7's exercises; each must fail its checker."""

import torch
import torch.nn.functional as F

from companion.causal_lm_loss import label_padding_loss


# training-ex1 ---------------------------------------------------------------
def every_eos_scored(input_ids, labels, eos_token_id):
    """Scores every position holding the id: the padding comes back too."""
    labels = labels.clone()
    labels[input_ids == eos_token_id] = eos_token_id
    return labels


def from_input_ids(input_ids, labels, eos_token_id):
    """Starts again from input_ids: the prompt is scored."""
    labels = input_ids.clone()
    first = (input_ids == eos_token_id).int().argmax(dim=1)
    later = torch.arange(input_ids.shape[1])[None] > first[:, None]
    labels[later] = -100
    return labels


def eos_id_hard_coded(input_ids, labels, eos_token_id):
    """Right for the chapter's id 2 only."""
    labels = labels.clone()
    first = (input_ids == 2).int().argmax(dim=1)
    labels[torch.arange(len(labels)), first] = 2
    return labels


# training-ex2 ---------------------------------------------------------------
def micro_batch_mean(outputs, labels, num_items_in_batch):
    """Each micro-batch's own mean: the Trainer's fallback, a mean of means."""
    return label_padding_loss(outputs["logits"], labels)


def without_the_shift(outputs, labels, num_items_in_batch):
    """Logits of position t scored against the label at t."""
    logits = outputs["logits"]
    total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return total / num_items_in_batch


def logged_value(outputs, labels, num_items_in_batch):
    """Right number, no gradient: .item() detaches it."""
    loss = label_padding_loss(outputs["logits"], labels, num_items_in_batch=1)
    return torch.tensor(loss.item() / float(num_items_in_batch), dtype=torch.float64)


# training-ex3 ---------------------------------------------------------------
def mask_document_ends(model, documents):
    """Masks the last token of each document instead of the next one's first."""
    input_ids = torch.tensor([sum(documents, [])])
    position_ids = torch.cat([torch.arange(len(d)) for d in documents])[None]
    labels = input_ids.clone()
    ends = torch.tensor([len(d) for d in documents]).cumsum(0) - 1
    labels[0, ends] = -100
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    return label_padding_loss(logits, labels)


def cache_left_on(model, documents):
    """Boundaries masked, but the forward pass keeps its default cache."""
    input_ids = torch.tensor([sum(documents, [])])
    position_ids = torch.cat([torch.arange(len(d)) for d in documents])[None]
    labels = input_ids.masked_fill(position_ids == 0, -100)
    logits = model(input_ids=input_ids, position_ids=position_ids).logits
    return label_padding_loss(logits, labels)


# training-ex4 ---------------------------------------------------------------
def pad_and_slice(labels, position_ids, ahead):
    """The formula for one document, applied to the packed row."""
    return F.pad(labels, (0, ahead), value=-100)[..., ahead:]


def mask_document_starts_only(labels, position_ids, ahead):
    """Drops a target only when it is a document's first token."""
    shifted = F.pad(labels, (0, ahead), value=-100)[..., ahead:]
    starts = F.pad(position_ids, (0, ahead), value=0)[..., ahead:] == 0
    return shifted.masked_fill(starts, -100)


def shifted_by_ahead_minus_one(labels, position_ids, ahead):
    """Off by one: the target of t taken at t + ahead - 1."""
    out = torch.full_like(labels, -100)
    step = ahead - 1
    if step == 0:
        return labels.clone()
    same = position_ids[:, step:] - position_ids[:, :-step] == step
    out[:, :-step] = torch.where(same, labels[:, step:], -100)
    return out


def ahead_position_grows(labels, position_ids, ahead):
    """Same document when the position id grows: a 1-token document slips through."""
    shifted = torch.full_like(labels, -100)
    if ahead >= labels.shape[1]:
        return shifted
    same_document = position_ids[:, ahead:] > position_ids[:, :-ahead]
    shifted[:, :-ahead] = labels[:, ahead:].masked_fill(~same_document, -100)
    return shifted


WRONG = {
    "training-ex1": [every_eos_scored, from_input_ids, eos_id_hard_coded],
    "training-ex2": [micro_batch_mean, without_the_shift, logged_value],
    "training-ex3": [mask_document_ends, cache_left_on],
    "training-ex4": [ahead_position_grows, pad_and_slice, mask_document_starts_only, shifted_by_ahead_minus_one],
}
