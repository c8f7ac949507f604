"""The tiny LLaVA batch through whichever transformers release is importable.

Usage: ``python -m companion.experiments.history_probes.transformers_release WEIGHTS``.
The first run (the pinned release) writes ``WEIGHTS``; the others load them,
so that every release computes with the same parameters (a seed alone does
not give equal weights: the initialisers changed between releases), through
names mapped to one canonical form (4.52 moved the language model under
``model.`` and the LM head to the top; 5.x holds the vision transformer
itself).

Prints one JSON object: the code path of the release's
``LlavaForConditionalGeneration.forward`` (its loss lines, read with
``inspect``), the loss of three label variants of one right-padded batch,
the release's own ``Trainer`` count of the scored targets, and the loss that
one ``Trainer.train()`` step logs with one micro-batch and with two.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VERSION = Version(transformers.__version__)
VOCAB, PAD, BOS, EOS, FIRST_TEXT, IMAGE = 64, 0, 1, 2, 3, 63
IMAGE_SIZE, PATCH, HIDDEN = 8, 4, 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def build_model() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    text = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=64, initializer_range=0.4,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    # 4.x takes image_token_index (4.52 adds image_token_id as an alias);
    # 4.45/4.46 expand the image only when image_seq_length equals the count.
    token = {"image_token_index": IMAGE} if VERSION < Version("5") else {"image_token_id": IMAGE}
    config = LlavaConfig(
        vision_config=vision, text_config=text, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=IMAGE_TOKENS, **token)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def canonical(name: str) -> str:
    for old, new in (("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.language_model.", "language_model."),
                     ("language_model.model.", "language_model."),
                     ("language_model.lm_head.", "lm_head.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return name.replace("vision_tower.vision_model.", "vision_tower.", 1)


def load_or_write_weights(model: torch.nn.Module, path: str) -> str:
    if not os.path.exists(path):
        torch.save({canonical(k): p.detach().clone() for k, p in model.named_parameters()}, path)
        return "written"
    weights = torch.load(path)
    names = {canonical(k) for k, _ in model.named_parameters()}
    if names != set(weights):
        raise RuntimeError(f"parameter names differ: {sorted(names ^ set(weights))[:6]}")
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(weights[canonical(k)])
    return "loaded"


def build_batch():
    """Three right-padded rows ``<bos> <image>*4 prompt answer``, the answer
    ending in ``<eos>``, and three label variants."""
    g = torch.Generator().manual_seed(0)
    prompts, answers = (2, 1, 3), (3, 1, 2)
    lengths = [1 + IMAGE_TOKENS + p + a for p, a in zip(prompts, answers)]
    rows, width = len(lengths), max(lengths)
    ids = torch.full((rows, width), PAD)
    mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), -100)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        text = torch.randint(FIRST_TEXT, IMAGE, (p + a,), generator=g)
        text[-1] = EOS
        ids[r, 0] = BOS
        ids[r, 1:1 + IMAGE_TOKENS] = IMAGE
        ids[r, 1 + IMAGE_TOKENS:lengths[r]] = text
        mask[r, :lengths[r]] = 1
        answer = slice(1 + IMAGE_TOKENS + p, lengths[r])
        labels[r, answer] = ids[r, answer]
    pixels = torch.randn(rows, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    # padding labelled with the pad id, as a collator that pads labels with
    # pad_token_id does
    pad_labeled = labels.clone()
    pad_labeled[mask == 0] = PAD
    # every real text token a label, <bos> in column 0 included
    lm_labels = ids.clone()
    lm_labels[(mask == 0) | (ids == IMAGE)] = -100
    return ids, mask, pixels, {"masked": labels, "pad_labeled": pad_labeled, "lm_labels": lm_labels}


def loss_lines(cls: type) -> list[str]:
    keys = ("shift_attention_mask =", "self.loss_function(", "loss_fct(")
    return [line.strip() for line in inspect.getsource(cls.forward).splitlines()
            if any(key in line for key in keys)]


def code_path(lines: list[str]) -> str:
    joined = " ".join(lines)
    if "self.loss_function(" in joined:
        return "loss_function (ForCausalLMLoss)"
    if "attention_mask[..., 1:]" in joined:
        return "mask filter, attention_mask[..., 1:]"
    if "attention_mask[:, -(logits.shape[1] - 1) :]" in joined:
        return "mask filter, attention_mask[:, -(T-1):]"
    return "other"


def trainer_counts(model, variants) -> dict:
    from transformers import Trainer, TrainingArguments

    out: dict = {}
    if not hasattr(Trainer, "get_batch_samples"):
        return {"none": "no Trainer.get_batch_samples"}
    parameters = inspect.signature(Trainer.get_batch_samples).parameters
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=TrainingArguments(
            output_dir=tmp, report_to="none", use_cpu=True))
        for name, labels in variants.items():
            batches = iter([{"labels": labels}])
            if "device" in parameters:
                _, count = trainer.get_batch_samples(batches, 1, torch.device("cpu"))
            else:
                _, count = trainer.get_batch_samples(batches, 1)
            out[name] = None if count is None else int(count)
    return out


def logged_losses(weights: str, ids, mask, pixels, labels) -> dict:
    """The loss one optimizer step logs: one micro-batch of the three rows,
    and two micro-batches (the three rows twice), learning rate 0."""
    from transformers import Trainer, TrainingArguments

    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "pixel_values": pixels[i],
             "labels": labels[i]} for i in range(ids.shape[0])]

    def collate(items):
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    out = {}
    for steps, data in ((1, rows), (2, rows + rows)):
        model = build_model()
        load_or_write_weights(model, weights)
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(
                output_dir=tmp, report_to="none", use_cpu=True, per_device_train_batch_size=3,
                gradient_accumulation_steps=steps, max_steps=1, learning_rate=0.0,
                logging_steps=1, save_strategy="no", remove_unused_columns=False,
                max_grad_norm=1e9, seed=0)
            trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
            trainer.train()
        out[str(steps)] = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return out


def main() -> None:
    weights = sys.argv[1]
    model = build_model()
    weights_were = load_or_write_weights(model, weights)
    ids, mask, pixels, variants = build_batch()
    lines = loss_lines(type(model))
    record = {"release": transformers.__version__, "weights": weights_were,
              "loss_lines": lines, "code_path": code_path(lines), "variants": {}}
    for name, labels in variants.items():
        with torch.no_grad():
            output = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        record["variants"][name] = {
            "loss": float(output.loss),
            "targets": int((labels[..., 1:] != -100).sum()),
            "labels": int((labels != -100).sum()),
        }
    record["trainer"] = trainer_counts(model, variants)
    record["train"] = logged_losses(weights, ids, mask, pixels, variants["lm_labels"])
    print(json.dumps(record))


if __name__ == "__main__":
    main()
