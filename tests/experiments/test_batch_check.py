"""Tests of companion.experiments.batch_check: the tokenizer, what the real
collators do to the labels, every pitfall reported on their batches and every
correct batch clean, over more than the chapter's one example."""

from __future__ import annotations

import pickle

import pytest
import torch

from companion import IGNORE_INDEX
from companion.batch_check import check_batch
from companion.causal_lm_loss import label_padding_loss
from companion.experiments import batch_check as bc
from companion.experiments import tiny_models as tm
from companion.experiments.llava import build_llava_batch


def codes(batch, **options):
    return [finding.code for finding in check_batch(batch, **options)]


@pytest.fixture(scope="module")
def tokenizer():
    return bc.bpe_tokenizer()


# ---------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------


def test_the_tokenizer_is_trained_the_same_every_time(tokenizer):
    vocabulary = dict(tokenizer.get_vocab())
    bc._trained_bpe.cache_clear()
    assert dict(bc.bpe_tokenizer().get_vocab()) == vocabulary
    assert len(tokenizer) == 320


def test_the_tokenizer_s_special_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(bc.SPECIAL_TOKENS))
    assert ids == list(range(len(bc.SPECIAL_TOKENS)))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.image_token_id == bc.SPECIAL_TOKENS.index("<image>")
    encoded = tokenizer("the cat")["input_ids"]
    assert encoded[0] == 1 and encoded[-1] == 2 and 2 not in encoded[1:-1]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "the cat"
    pad_eos = bc.bpe_tokenizer(pad_is_eos=True, padding_side="left")
    assert pad_eos.pad_token_id == pad_eos.eos_token_id == 2 and pad_eos.padding_side == "left"


def test_the_tokenizer_s_arguments_are_checked():
    with pytest.raises(TypeError, match="^pad_is_eos"):
        bc.bpe_tokenizer(pad_is_eos=1)
    with pytest.raises(ValueError, match="^padding_side"):
        bc.bpe_tokenizer(padding_side="middle")


# ---------------------------------------------------------------------------
# What each collator does to the labels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("texts", [bc.TEXTS, bc.CORPUS, ("a cat", "the dog ran in the park today")])
def test_the_language_model_collator_masks_every_eos_when_pad_is_eos(texts):
    tokenizer = bc.bpe_tokenizer(pad_is_eos=True)
    batch = bc.language_model_batch(tokenizer, texts)
    eos = tokenizer.eos_token_id
    real_eos = (batch["input_ids"] == eos) & (batch["attention_mask"] == 1)
    assert int(real_eos.sum()) == len(texts)  # one EOS ends every row
    assert bool((batch["labels"][real_eos] == IGNORE_INDEX).all())
    assert codes(batch, tokenizer=tokenizer) == ["eos-targets-masked"]
    right = bc.language_model_batch(bc.bpe_tokenizer(), texts)
    assert bool((right["labels"] == eos).sum() == len(texts))
    assert codes(right, tokenizer=bc.bpe_tokenizer()) == []


def test_left_padding_scores_the_first_token_after_the_padding():
    tokenizer = bc.bpe_tokenizer(padding_side="left")
    batch = bc.language_model_batch(tokenizer)
    assert codes(batch, tokenizer=tokenizer) == ["target-after-padding"]
    assert codes(bc.language_model_batch(bc.bpe_tokenizer()), tokenizer=bc.bpe_tokenizer()) == []


@pytest.mark.parametrize("texts", [bc.TEXTS, bc.CORPUS[:5]])
def test_the_flattening_collator_masks_each_document_s_first_label(tokenizer, texts):
    batch = bc.flattened_batch(tokenizer, texts)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = (batch["position_ids"] == 0).nonzero()[:, 1]
    assert len(starts) == len(texts)
    assert bool((batch["labels"][0, starts] == IGNORE_INDEX).all())
    assert codes(batch, tokenizer=tokenizer) == []
    wrong = bc.flattened_batch(tokenizer, texts, labels_from_input_ids=True)
    found = check_batch(wrong, tokenizer=tokenizer)
    assert [f.code for f in found] == ["packed-boundary-scored"]
    assert found[0].count == len(texts) - 1  # the first document has nothing before it


def test_a_separator_that_is_a_token_is_a_scored_boundary(tokenizer):
    from transformers import DataCollatorWithFlattening

    features = [{"input_ids": ids} for ids in tokenizer(list(bc.TEXTS))["input_ids"]]
    batch = dict(DataCollatorWithFlattening(separator_id=tokenizer.eos_token_id)(features))
    assert codes(batch, tokenizer=tokenizer) == ["packed-boundary-scored"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_seq2seq_collator_pads_the_labels_with_what_it_is_told(side):
    tokenizer = bc.bpe_tokenizer(padding_side=side)
    right = bc.seq2seq_batch(tokenizer)
    padding = right["attention_mask"] == 0
    assert bool(padding.any()) and bool((right["labels"][padding] == IGNORE_INDEX).all())
    assert codes(right, tokenizer=tokenizer) == []
    wrong = bc.seq2seq_batch(tokenizer, label_pad_token_id=tokenizer.pad_token_id)
    assert bool((wrong["labels"][padding] == tokenizer.pad_token_id).all())
    assert codes(wrong, tokenizer=tokenizer) == ["padding-scored"]


def test_the_chat_template_marks_the_answer_and_its_turn_end(tokenizer):
    batch = bc.chat_batch(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    for row, (_, answer) in enumerate(bc.PROMPTS_AND_ANSWERS):
        marked = batch["input_ids"][row][batch["assistant_masks"][row] == 1].tolist()
        assert marked[-1] == end
        assert tokenizer.decode(marked[:-1]) == answer
    assert bool((batch["labels"] == IGNORE_INDEX).sum() > 0)
    assert codes(batch, tokenizer=tokenizer) == []
    wrong = bc.chat_batch(tokenizer, use_assistant_mask=False)
    assert codes(wrong, tokenizer=tokenizer) == ["prompt-scored"]
    # without the mask the checker cannot tell prompt from answer
    unmarked = {k: v for k, v in wrong.items() if k != "assistant_masks"}
    assert codes(unmarked, tokenizer=tokenizer) == []


def test_truncation_that_cuts_the_answers_leaves_rows_without_targets(tokenizer):
    batch = bc.chat_batch(tokenizer, max_length=12)
    assert batch["input_ids"].shape[1] == 12
    found = check_batch(batch, tokenizer=tokenizer)
    assert [f.code for f in found] == ["row-without-targets"]
    empty_rows = [row for row in range(3) if not bool((batch["labels"][row, 1:] != IGNORE_INDEX).any())]
    assert list(found[0].rows) == empty_rows and empty_rows
    assert codes(bc.chat_batch(tokenizer, max_length=9), tokenizer=tokenizer) == ["batch-without-targets"]


def test_the_llava_tutorial_labels_score_the_image_and_the_prompt():
    llava = build_llava_batch([2, 5, 3], [6, 2, 3], seed=0)
    wrong = bc.llava_labels_from_input_ids(llava)
    assert torch.equal(wrong["labels"][wrong["attention_mask"] == 1], llava.input_ids[llava.attention_mask == 1])
    ids = {"placeholder_token_ids": [tm.IMAGE_TOKEN_ID]}
    assert codes(wrong, **ids) == ["placeholder-scored"]
    assert codes(llava.model_inputs(), **ids) == []


def test_added_tokens_beyond_the_model_s_vocabulary(tokenizer):
    extended = bc.bpe_tokenizer()
    extended.add_tokens(["<tool>"], special_tokens=True)
    batch = bc.language_model_batch(extended, ["<tool> the cat", "a dog"])
    found = codes(batch, tokenizer=extended, vocab_size=len(tokenizer))
    assert found == ["label-out-of-range", "input-id-out-of-range"]
    assert codes(batch, tokenizer=extended) == []


def test_every_collator_case_is_reported_as_expected():
    cases = bc.collator_cases()
    assert [bool(case.expected) for case in cases] == [True, False] * 5
    table = bc.findings_table(cases)
    assert list(table.columns) == ["collator", "labels", "findings", "as expected"]
    assert bool(table["as expected"].all()), table.to_string()
    assert set(table.loc[1::2, "findings"]) == {"none"}


def test_findings_table_checks_its_argument():
    with pytest.raises(TypeError, match=r"^cases\[0\]"):
        bc.findings_table([1])


# ---------------------------------------------------------------------------
# The model, the command line, the unsafe file, the benchmark batch
# ---------------------------------------------------------------------------


def test_mean_loss_model_is_the_mean_next_token_loss():
    tiny = tm.build_tiny_lm(seed=0)
    ids = torch.tensor([[1, 4, 5, 6], [1, 7, 0, 0]])
    labels = torch.where(ids == 0, IGNORE_INDEX, ids)
    out = bc.MeanLossModel(tiny)(ids, labels)
    assert torch.equal(out["logits"], tiny(ids))
    assert out["loss"].item() == label_padding_loss(tiny(ids), labels).item()
    assert set(bc.MeanLossModel(tiny)(ids)) == {"logits"}
    with pytest.raises(TypeError, match="^language_model"):
        bc.MeanLossModel(torch.nn.Linear(2, 2))


def test_run_cli(tokenizer):
    status, output = bc.run_cli(bc.language_model_batch(tokenizer), ["--pad-token-id", "0"])
    assert status == 0 and output.startswith("batch.pt: 3 x ") and output.endswith("no findings")
    pad_eos = bc.bpe_tokenizer(pad_is_eos=True)
    status, output = bc.run_cli(bc.language_model_batch(pad_eos), ["--pad-token-id", "2", "--eos-token-id", "2"],
                                file_name="sft.pt")
    assert status == 1 and output.startswith("sft.pt: ") and "eos-targets-masked" in output
    with pytest.raises(ValueError, match="^file_name"):
        bc.run_cli({}, file_name="a/b.pt")
    with pytest.raises(TypeError, match="^arguments"):
        bc.run_cli({}, [1])


def test_the_code_running_pickle_runs_code_when_unpickled(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    bc.write_code_running_pickle(path, marker)
    assert not marker.exists()
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()
    with pytest.raises(TypeError, match="^path"):
        bc.write_code_running_pickle(3, marker)


@pytest.mark.parametrize(("rows", "columns"), [(1, 64), (3, 100), (8, 1024)])
def test_the_benchmark_batch_is_clean_and_exercises_every_check(rows, columns):
    batch = bc.benchmark_batch(rows, columns)
    assert {key: tuple(value.shape) for key, value in batch.items()} == {
        key: (rows, columns) for key in ("input_ids", "attention_mask", "position_ids", "labels", "assistant_masks")}
    ids = {"pad_token_id": 0, "eos_token_id": 2, "vocab_size": 64, "placeholder_token_ids": [tm.IMAGE_TOKEN_ID]}
    assert check_batch(batch, **ids) == []
    assert bool((batch["input_ids"] == tm.IMAGE_TOKEN_ID).any()) and bool((batch["position_ids"] == 0).sum() > rows)
    wrong = {**batch, "labels": batch["input_ids"].clone()}
    assert {"placeholder-scored", "packed-boundary-scored", "prompt-scored"} <= set(codes(wrong, **ids))
    with pytest.raises(ValueError, match="^time"):
        bc.benchmark_batch(2, 32)


def test_the_committed_benchmark_results():
    results = bc.benchmark_results()
    assert results["benchmark"] == "batch_check"
    assert {"machine", "libraries", "results"} <= set(results)
    largest = max(results["results"], key=lambda r: r["batch"] * r["time"])
    assert (largest["batch"], largest["time"]) == (64, 4096)
    assert largest["median_s"] < 1.0
