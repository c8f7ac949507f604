"""The last chapter's experiments: real collators' batches, right and wrong.

Everything is built offline, in code:

* :func:`bpe_tokenizer`, a byte-level BPE tokenizer trained on
  :data:`CORPUS` with the ``tokenizers`` library, wrapped as a transformers
  ``PreTrainedTokenizerFast`` with begin and end-of-sequence, padding, an
  image placeholder and a chat template whose assistant turns are marked
  for ``return_assistant_tokens_mask``;
* batches from the real collators of transformers, each in a correct and a
  wrong form: :func:`language_model_batch`
  (``DataCollatorForLanguageModeling(mlm=False)``),
  :func:`flattened_batch` (``DataCollatorWithFlattening``),
  :func:`seq2seq_batch` (``DataCollatorForSeq2Seq``), :func:`chat_batch`
  (``apply_chat_template`` with the assistant mask) and
  :func:`llava_labels_from_input_ids` (chapter 2's LLaVA batch labelled as
  some fine-tuning tutorials did); :func:`collator_cases` lists them all
  with what the checker should report, and :func:`findings_table` runs it;
* :class:`MeanLossModel`, a model that computes its own mean loss but
  takes no loss keyword arguments, for :func:`companion.batch_check.check_loss`;
* :func:`run_cli`, the command line on a saved batch, as a reader would run
  it; :func:`write_code_running_pickle`, a file that would run code if it
  were loaded unsafely;
* :func:`benchmark_batch`, the batch the benchmark times, and
  :func:`benchmark_results`, its committed results.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_int,
    require_mapping,
    require_positive_int,
    require_sequence,
)
from companion.batch_check import check_batch
from companion.causal_lm_loss import label_padding_loss
from companion.experiments.llava import build_llava_batch
from companion.experiments.loss_memory import results_directory
from companion.experiments.tiny_models import (
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    TinyCausalLM,
)

__all__ = [
    "BENCHMARK_RESULTS_FILE",
    "CHAT_TEMPLATE",
    "CONVERSATIONS",
    "CORPUS",
    "CollatorCase",
    "MeanLossModel",
    "PROMPTS_AND_ANSWERS",
    "SPECIAL_TOKENS",
    "TEXTS",
    "benchmark_batch",
    "benchmark_results",
    "bpe_tokenizer",
    "chat_batch",
    "collator_cases",
    "findings_table",
    "flattened_batch",
    "language_model_batch",
    "llava_labels_from_input_ids",
    "run_cli",
    "seq2seq_batch",
    "write_code_running_pickle",
]

CORPUS: tuple[str, ...] = (
    "the cat sat on the mat",
    "a dog ran in the park",
    "what is in the picture",
    "the answer is a cat",
    "tell me about the weather",
    "it is sunny and warm today",
    "which animal is on the mat",
    "a small cat and a big dog",
)
"""The sentences the tokenizer is trained on."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|end|>",
)
"""Special tokens, ids 0 to 7 in this order: padding, begin and end of
sequence, unknown, the image placeholder, and the chat roles and turn end."""

CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "<|user|>{{ message['content'] }}<|end|>"
    "{% else %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)
"""A Jinja chat template; ``{% generation %}`` marks what the assistant writes,
which ``return_assistant_tokens_mask=True`` turns into the assistant mask."""

TEXTS: tuple[str, ...] = (
    "the cat sat on the mat",
    "a small cat and a big dog ran in the park",
    "it is sunny",
)
"""Documents of different lengths for the language-modelling batches."""

PROMPTS_AND_ANSWERS: tuple[tuple[str, str], ...] = (
    ("what is in the picture", "a cat"),
    ("which animal is on the mat", "the answer is a small cat"),
    ("tell me about the weather", "it is sunny and warm today"),
)
"""Prompt and answer pairs for the supervised fine-tuning batches."""

CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = tuple(
    ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})
    for prompt, answer in PROMPTS_AND_ANSWERS
)
"""The same pairs as one-turn chats."""


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> Any:
    """The raw ``tokenizers.Tokenizer``, trained once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>")), ("</s>", SPECIAL_TOKENS.index("</s>"))],
    )
    return bpe


def bpe_tokenizer(*, pad_is_eos: bool = False, padding_side: str = "right") -> Any:
    """A small byte-level BPE tokenizer, trained in code on :data:`CORPUS`.

    Args:
        pad_is_eos: use ``</s>`` as the padding token too, as many
            fine-tuning scripts do for models that ship without one
            (``tokenizer.pad_token = tokenizer.eos_token``).
        padding_side: ``"right"`` or ``"left"``.

    Returns:
        A new ``transformers.PreTrainedTokenizerFast``: ``<s> text </s>``
        for each text, ``image_token_id`` for ``<image>``, and
        :data:`CHAT_TEMPLATE`.  Nothing is downloaded.
    """
    if not isinstance(pad_is_eos, bool):
        raise TypeError(f"pad_is_eos must be a bool; got {type(pad_is_eos).__name__}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>" if pad_is_eos else "<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side=padding_side,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _check_texts(texts: Any, name: str) -> list[str]:
    require_sequence(texts, name, "a sequence of strings")
    if not texts or not all(isinstance(text, str) and text for text in texts):
        raise ValueError(f"{name} must be a non-empty sequence of non-empty strings")
    return list(texts)


def language_model_batch(tokenizer: Any, texts: Sequence[str] = TEXTS) -> dict[str, torch.Tensor]:
    """``DataCollatorForLanguageModeling(tokenizer, mlm=False)`` on ``texts``.

    The collator pads, copies ``input_ids`` into ``labels`` and sets every
    label equal to ``tokenizer.pad_token_id`` to ``-100``.

    Args:
        tokenizer: from :func:`bpe_tokenizer`.
        texts: the documents, one row each.
    """
    from transformers import DataCollatorForLanguageModeling

    texts = _check_texts(texts, "texts")
    features = [{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]]
    return dict(DataCollatorForLanguageModeling(tokenizer, mlm=False)(features))


def flattened_batch(
    tokenizer: Any, texts: Sequence[str] = TEXTS, *, labels_from_input_ids: bool = False
) -> dict[str, torch.Tensor]:
    """``DataCollatorWithFlattening`` on ``texts``: one row, ``position_ids``.

    The collator concatenates the documents and sets the first label of
    each to ``-100``, so that no document's first token is predicted from
    the one before it.

    Args:
        tokenizer: from :func:`bpe_tokenizer`.
        texts: the documents, packed into one row.
        labels_from_input_ids: replace the collator's labels by a copy of
            ``input_ids``, as a training step that sets
            ``labels = input_ids.clone()`` does.
    """
    from transformers import DataCollatorWithFlattening

    texts = _check_texts(texts, "texts")
    if not isinstance(labels_from_input_ids, bool):
        raise TypeError(
            "labels_from_input_ids must be a bool; "
            f"got {type(labels_from_input_ids).__name__}"
        )
    features = [{"input_ids": ids} for ids in tokenizer(texts)["input_ids"]]
    batch = dict(DataCollatorWithFlattening()(features))
    if labels_from_input_ids:
        batch["labels"] = batch["input_ids"].clone()
    return batch


def seq2seq_batch(
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]] = PROMPTS_AND_ANSWERS,
    *,
    label_pad_token_id: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """``DataCollatorForSeq2Seq`` on prompt-and-answer rows of a causal LM.

    Each row is ``<s> prompt answer </s>`` with the prompt's labels
    ``-100``; the collator pads ``input_ids`` with the pad id and the
    labels with ``label_pad_token_id``.

    Args:
        tokenizer: from :func:`bpe_tokenizer`.
        pairs: ``(prompt, answer)`` texts.
        label_pad_token_id: the label of padded positions; ``-100`` is
            right, the pad id is the bug.
    """
    from transformers import DataCollatorForSeq2Seq

    require_sequence(pairs, "pairs", "a sequence of (prompt, answer) pairs")
    label_pad_token_id = require_int(label_pad_token_id, "label_pad_token_id")
    features = []
    for prompt, answer in pairs:
        prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        answer_ids = [*tokenizer(" " + answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        features.append({
            "input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        })
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=label_pad_token_id)
    return dict(collator(features))


def chat_batch(
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, str]]] = CONVERSATIONS,
    *,
    use_assistant_mask: bool = True,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Chats through ``apply_chat_template``, padded, with the assistant mask.

    Args:
        tokenizer: from :func:`bpe_tokenizer`.
        conversations: one list of messages per row.
        use_assistant_mask: labels only on the assistant's tokens (right);
            with ``False`` the labels are ``input_ids`` with the padding set
            to ``-100``, so the prompts are scored.
        max_length: truncate every row to this many tokens.

    Returns:
        ``input_ids``, ``attention_mask``, ``assistant_masks`` (1 on the
        assistant's tokens) and ``labels``, ``(B, T)`` int64.
    """
    require_sequence(conversations, "conversations", "a sequence of chats")
    if not isinstance(use_assistant_mask, bool):
        raise TypeError(
            f"use_assistant_mask must be a bool; got {type(use_assistant_mask).__name__}"
        )
    options: dict[str, Any] = {}
    if max_length is not None:
        options = {"truncation": True, "max_length": require_positive_int(max_length, "max_length")}
    encoded = tokenizer.apply_chat_template(
        [list(chat) for chat in conversations],
        return_assistant_tokens_mask=True,
        return_dict=True,
        padding=True,
        return_tensors="pt",
        **options,
    )
    batch = {key: encoded[key].long() for key in ("input_ids", "attention_mask", "assistant_masks")}
    if use_assistant_mask:
        batch["labels"] = torch.where(
            batch["assistant_masks"] == 1, batch["input_ids"], IGNORE_INDEX
        )
    else:
        batch["labels"] = torch.where(
            batch["attention_mask"] == 1, batch["input_ids"], IGNORE_INDEX
        )
    return batch


def llava_labels_from_input_ids(batch: Any) -> dict[str, torch.Tensor]:
    """Chapter 2's LLaVA batch, labelled as some fine-tuning tutorials did.

    ``labels = input_ids.clone()`` with only the padding set to ``-100``:
    the begin token, the image placeholders and the prompt are all scored.

    Args:
        batch: a :class:`~companion.experiments.llava.LlavaTrainingBatch`.

    Returns:
        The model inputs with those labels.
    """
    inputs = batch.model_inputs()
    labels = torch.where(inputs["attention_mask"] == 1, inputs["input_ids"], IGNORE_INDEX)
    return {**inputs, "labels": labels}


class MeanLossModel(nn.Module):
    """A causal LM that computes its own mean loss and takes no ``**kwargs``.

    ``forward(input_ids, labels=None)`` returns ``{"logits": (B, T, V)}``
    and, with labels, ``"loss"``: the mean next-token loss of the batch
    (:func:`~companion.causal_lm_loss.label_padding_loss`), as many
    hand-written models compute it.  Without ``**kwargs`` transformers'
    ``Trainer`` never passes it ``num_items_in_batch``.

    Args:
        language_model: a :class:`~companion.experiments.tiny_models.TinyCausalLM`.
    """

    def __init__(self, language_model: TinyCausalLM) -> None:
        super().__init__()
        if not isinstance(language_model, TinyCausalLM):
            raise TypeError(
                "language_model must be a TinyCausalLM; "
                f"got {type(language_model).__name__}"
            )
        self.language_model = language_model

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits, and the mean loss when ``labels`` are given."""
        logits = self.language_model(input_ids)
        if labels is None:
            return {"logits": logits}
        return {"logits": logits, "loss": label_padding_loss(logits, labels)}


@dataclass(frozen=True)
class CollatorCase:
    """One batch from a real collator, and what the checker should say.

    Attributes:
        name: the case, as the chapter's table shows it.
        collator: what made the batch.
        expected: the finding codes the batch must produce (empty: none).
        batch: the batch.
        options: keyword arguments of :func:`companion.batch_check.check_batch`
            beyond the batch.
    """

    name: str
    collator: str
    expected: tuple[str, ...]
    batch: dict[str, torch.Tensor] = field(repr=False)
    options: dict[str, Any] = field(default_factory=dict, repr=False)


def collator_cases() -> list[CollatorCase]:
    """Every pitfall in a real collator's batch, and the same batch done right.

    Returns:
        Pairs of cases, wrong then right, in the chapter's order.
    """
    tokenizer = bpe_tokenizer()
    pad_eos = bpe_tokenizer(pad_is_eos=True)
    llava = build_llava_batch([2, 5, 3], [6, 2, 3], seed=0)
    llava_ids = {
        "vocab_size": VOCAB_SIZE, "pad_token_id": PAD_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID, "placeholder_token_ids": [IMAGE_TOKEN_ID],
    }
    language_model = "DataCollatorForLanguageModeling"
    return [
        CollatorCase("pad = eos", language_model, ("eos-targets-masked",),
                     language_model_batch(pad_eos), {"tokenizer": pad_eos}),
        CollatorCase("pad != eos", language_model, (),
                     language_model_batch(tokenizer), {"tokenizer": tokenizer}),
        CollatorCase("labels padded with the pad id", "DataCollatorForSeq2Seq", ("padding-scored",),
                     seq2seq_batch(tokenizer, label_pad_token_id=tokenizer.pad_token_id),
                     {"tokenizer": tokenizer}),
        CollatorCase("labels padded with -100", "DataCollatorForSeq2Seq", (),
                     seq2seq_batch(tokenizer), {"tokenizer": tokenizer}),
        CollatorCase("image tokens in the labels", "LLaVA batch (chapter 2)", ("placeholder-scored",),
                     llava_labels_from_input_ids(llava), llava_ids),
        CollatorCase("answer only", "LLaVA batch (chapter 2)", (),
                     llava.model_inputs(), llava_ids),
        CollatorCase("labels = input_ids", "apply_chat_template", ("prompt-scored",),
                     chat_batch(tokenizer, use_assistant_mask=False), {"tokenizer": tokenizer}),
        CollatorCase("labels from the assistant mask", "apply_chat_template", (),
                     chat_batch(tokenizer), {"tokenizer": tokenizer}),
        CollatorCase("labels = input_ids", "DataCollatorWithFlattening", ("packed-boundary-scored",),
                     flattened_batch(tokenizer, labels_from_input_ids=True), {"tokenizer": tokenizer}),
        CollatorCase("the collator's labels", "DataCollatorWithFlattening", (),
                     flattened_batch(tokenizer), {"tokenizer": tokenizer}),
    ]


def findings_table(cases: Sequence[CollatorCase]) -> pd.DataFrame:
    """Run :func:`companion.batch_check.check_batch` on every case.

    Returns:
        One row per case: ``collator``, ``labels`` (the case's name),
        ``findings`` (the codes found, or ``"none"``) and ``as expected``.
    """
    require_sequence(cases, "cases", "a sequence of CollatorCase")
    rows = []
    for index, case in enumerate(cases):
        if not isinstance(case, CollatorCase):
            raise TypeError(f"cases[{index}] must be a CollatorCase; got {type(case).__name__}")
        found = tuple(finding.code for finding in check_batch(case.batch, **case.options))
        rows.append({
            "collator": case.collator,
            "labels": case.name,
            "findings": ", ".join(found) or "none",
            "as expected": found == case.expected,
        })
    return pd.DataFrame(rows)


def run_cli(
    batch: dict[str, torch.Tensor], arguments: Sequence[str] = (), *, file_name: str = "batch.pt"
) -> tuple[int, str]:
    """Save ``batch`` with ``torch.save`` and run ``python -m companion check`` on it.

    The file is written in a fresh temporary folder, which is also the
    command's working folder, so the output names ``file_name`` alone.

    Args:
        batch: a dict of tensors.
        arguments: further command-line arguments, e.g.
            ``["--pad-token-id", "2"]``.
        file_name: the file's name.

    Returns:
        ``(exit status, standard output and error)``.
    """
    require_mapping(batch, "batch", "a dict of tensors")
    require_sequence(arguments, "arguments", "a sequence of strings")
    if not all(isinstance(argument, str) for argument in arguments):
        raise TypeError("arguments must hold strings only")
    if not isinstance(file_name, str) or not file_name or os.sep in file_name:
        raise ValueError(f"file_name must be a plain file name; got {file_name!r}")
    root = Path(__file__).resolve().parents[2]
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(root), *filter(None, [environment.get("PYTHONPATH")])]
    )
    with tempfile.TemporaryDirectory() as folder:
        torch.save(dict(batch), Path(folder) / file_name)
        done = subprocess.run(
            [sys.executable, "-m", "companion", "check", file_name, *arguments],
            cwd=folder, capture_output=True, text=True, check=False,
            timeout=300, env=environment,
        )
    return done.returncode, (done.stdout + done.stderr).rstrip()


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: it creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def write_code_running_pickle(path: str | os.PathLike[str], marker: str | os.PathLike[str]) -> None:
    """Write a pickle at ``path`` that creates ``marker`` if it is unpickled.

    Loaded with plain ``pickle.load`` (or ``torch.load(...,
    weights_only=False)``) it calls ``open(marker, "w")``, a stand-in for
    any code an attacker could run; ``weights_only=True`` refuses it.

    Args:
        path: the file to write.
        marker: the file the pickle would create.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    if not isinstance(marker, (str, os.PathLike)):
        raise TypeError(f"marker must be a str or os.PathLike; got {type(marker).__name__}")
    payload = {"input_ids": _RunsCode(os.fspath(marker)), "labels": torch.zeros(1, 2)}
    with open(path, "wb") as handle:
        pickle.dump(payload, handle, protocol=2)


def benchmark_batch(batch: int = 64, time: int = 4096, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A realistic batch of ``B x T`` for timing the checker.

    Right-padded rows of random lengths from ``T/2`` to ``T``, each four
    packed documents of ``T/4`` positions (``position_ids`` restart at
    each) whose first quarter is a prompt with ``-100`` labels, an image
    placeholder run after the first token, and an assistant mask equal to
    the scored labels.  The special ids are those of
    :mod:`~companion.experiments.tiny_models`; checked with them (and any
    ``V >= 64``) the batch has no finding, so every check runs to its end.

    Args:
        batch: ``B >= 1``.
        time: ``T >= 64``.
        seed: seed of the lengths and token ids.
    """
    batch = require_positive_int(batch, "batch")
    time = require_positive_int(time, "time")
    if time < 64:
        raise ValueError(f"time must be >= 64; got {time}")
    require_int(seed, "seed")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, IMAGE_TOKEN_ID, (batch, time), generator=generator)
    input_ids[:, 0] = 1
    lengths = torch.randint(time // 2, time + 1, (batch,), generator=generator)
    columns = torch.arange(time)
    attention_mask = (columns[None, :] < lengths[:, None]).long()
    document = time // 4
    position_ids = columns.remainder(document).expand(batch, time).clone()
    input_ids[:, 1 : 1 + document // 8] = IMAGE_TOKEN_ID
    answer = (position_ids >= document // 4) & (attention_mask == 1)
    labels = torch.where(answer, input_ids, IGNORE_INDEX)
    input_ids = torch.where(attention_mask == 1, input_ids, PAD_TOKEN_ID)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "assistant_masks": answer.long(),
    }


BENCHMARK_RESULTS_FILE: str = "batch_check_cpu.json"
"""The committed results of ``benchmarks/batch_check.py`` on the CPU."""


def benchmark_results(start: str | os.PathLike[str] = ".") -> dict[str, Any]:
    """The committed benchmark results, found from ``start`` upward.

    Args:
        start: a folder inside the repository (the notebooks run in
            ``book/``).
    """
    if not isinstance(start, (str, os.PathLike)):
        raise TypeError(f"start must be a str or os.PathLike; got {type(start).__name__}")
    path = results_directory(Path(start)) / BENCHMARK_RESULTS_FILE
    return json.loads(path.read_text())
