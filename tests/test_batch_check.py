"""Tests of companion.batch_check: every finding both ways, against a slow
per-token reference; the loss checks on the book's tiny models and against
transformers' own Trainer; the file loader on untrusted input."""

from __future__ import annotations

import json
import pickle
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from docutils.nodes import make_id
from hypothesis import given
from hypothesis import strategies as st

from companion import IGNORE_INDEX
from companion.batch_check import (
    ASSISTANT_MASK_KEY,
    FINDING_CODES,
    MAX_POSITIONS,
    Finding,
    Severity,
    accepts_loss_kwargs,
    check_batch,
    check_loss,
    format_findings,
    load_batch,
)
from companion.causal_lm_loss import count_scored_targets, label_padding_loss
from companion.experiments import tiny_models as tm
from companion.experiments.batch_check import MeanLossModel, write_code_running_pickle
from companion.experiments.denominator import make_counting_batch
from companion.experiments.llava import build_llava_batch

ROOT = Path(__file__).resolve().parent.parent


def codes(findings: list[Finding]) -> list[str]:
    return [finding.code for finding in findings]


def by_code(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.code: finding for finding in findings}


# ---------------------------------------------------------------------------
# Codes, severities and links
# ---------------------------------------------------------------------------


def _anchors(notebook: Path) -> set[str]:
    """MyST labels ``(name)=`` and the section ids Sphinx makes from headings."""
    anchors = set()
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        source = "".join(cell["source"])
        anchors.update(re.findall(r"^\(([\w-]+)\)=\s*$", source, re.MULTILINE))
        in_fence = False
        for line in source.splitlines():
            if line.startswith("```"):
                in_fence = not in_fence
            heading = re.match(r"^#{1,6} (.+)$", line)
            if heading and not in_fence:
                anchors.add(make_id(re.sub(r"[`$]", "", heading.group(1))))
    return anchors


@pytest.mark.parametrize("code", sorted(FINDING_CODES))
def test_every_link_points_to_an_anchor_that_exists(code):
    severity, link = FINDING_CODES[code]
    assert isinstance(severity, Severity)
    page, anchor = link.split("#")
    assert page.startswith("book/") and page.endswith(".html")
    notebook = ROOT / (page.removesuffix(".html") + ".ipynb")
    assert notebook.is_file(), notebook
    assert anchor in _anchors(notebook), f"{anchor} is not a label or heading of {notebook.name}"


def test_the_anchor_reader_agrees_with_the_built_site_where_there_is_one():
    built = ROOT / "_build" / "html" / "book" / "05_one_denominator.html"
    if not built.is_file():
        pytest.skip("no built site in _build/html")
    ids = set(re.findall(r'\bid="([^"]+)"', built.read_text(encoding="utf-8")))
    assert _anchors(ROOT / "book" / "05_one_denominator.ipynb") <= ids


def test_severities_are_ordered_and_codes_are_stable_short_ids():
    assert [s.rank for s in (Severity.INFO, Severity.WARNING, Severity.ERROR)] == [0, 1, 2]
    assert Severity("error") is Severity.ERROR and str(Severity.WARNING) == "warning"
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", code) for code in FINDING_CODES)
    assert {severity for severity, _ in FINDING_CODES.values()} == set(Severity)


# ---------------------------------------------------------------------------
# A slow, per-token reference of every position-level check
# ---------------------------------------------------------------------------


def slow_findings(batch, *, vocab, pad, eos, placeholders, ignore=IGNORE_INDEX):
    """``{code: set of (row, column)}``, token by token in plain Python."""
    ids = batch["input_ids"].tolist()
    labels = batch["labels"].tolist()
    rows, columns = len(ids), len(ids[0])
    mask = batch.get("attention_mask")
    mask = mask.tolist() if mask is not None else [[1] * columns for _ in range(rows)]
    has_mask = "attention_mask" in batch
    positions = batch.get("position_ids")
    assistant = batch.get(ASSISTANT_MASK_KEY)
    found = defaultdict(set)
    for b in range(rows):
        for t in range(columns):
            x, y = ids[b][t], labels[b][t]
            scored = y != ignore
            target = scored and t >= 1
            if scored and not 0 <= y < vocab:
                found["label-out-of-range"].add((b, t))
            if not 0 <= x < vocab:
                found["input-id-out-of-range"].add((b, t))
            if has_mask and target and mask[b][t] == 0:
                found["padding-scored"].add((b, t))
            if has_mask and target and mask[b][t] != 0 and mask[b][t - 1] == 0:
                found["target-after-padding"].add((b, t))
            if target and (x in placeholders or y in placeholders):
                found["placeholder-scored"].add((b, t))
            if positions is not None and target and positions[b][t] != positions[b][t - 1] + 1:
                found["packed-boundary-scored"].add((b, t))
            if assistant is not None:
                if target and assistant[b][t] == 0 and mask[b][t] != 0:
                    found["prompt-scored"].add((b, t))
                if t >= 1 and assistant[b][t] != 0 and not scored:
                    found["assistant-token-unscored"].add((b, t))
        if pad == eos:
            real = [t for t in range(1, columns) if ids[b][t] == eos and mask[b][t] != 0]
            eos_scored = any(labels[b][t] == eos and labels[b][t] != ignore for t in range(1, columns))
            if real and not eos_scored:
                found["eos-targets-masked"].update((b, t) for t in real if labels[b][t] == ignore)
    return found


@st.composite
def small_batches(draw):
    rows, columns = draw(st.integers(1, 4)), draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (rows, columns), generator=g)
    labels = torch.where(torch.rand(rows, columns, generator=g) < 0.4, IGNORE_INDEX, ids)
    if draw(st.booleans()):
        labels = torch.where(torch.rand(rows, columns, generator=g) < 0.1, -3, labels)
    batch = {"input_ids": ids, "labels": labels}
    if draw(st.booleans()):
        batch["attention_mask"] = (torch.rand(rows, columns, generator=g) < 0.7).long()
    if draw(st.booleans()):
        batch["position_ids"] = torch.randint(0, 4, (rows, columns), generator=g)
    if draw(st.booleans()):
        batch[ASSISTANT_MASK_KEY] = (torch.rand(rows, columns, generator=g) < 0.5).long()
    pad, eos = draw(st.sampled_from([(0, 2), (2, 2), (1, 1)]))
    return batch, pad, eos


@given(small_batches())
def test_check_batch_matches_the_slow_reference(case):
    batch, pad, eos = case
    vocab, placeholders = 8, [5]
    rows, columns = batch["input_ids"].shape
    findings = check_batch(
        batch, vocab_size=vocab, pad_token_id=pad, eos_token_id=eos,
        placeholder_token_ids=placeholders, max_positions=rows * columns,
    )
    expected = slow_findings(batch, vocab=vocab, pad=pad, eos=eos, placeholders=placeholders)
    got = {f.code: set(f.positions) for f in findings if f.positions}
    assert got == {code: positions for code, positions in expected.items() if positions}
    for finding in findings:
        if finding.positions:
            assert finding.count == len(finding.positions)
            assert list(finding.positions) == sorted(finding.positions)
    targets = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)
    row_codes = {"row-without-targets", "batch-without-targets"} & set(codes(findings))
    if not bool(targets.any()):
        assert row_codes == {"batch-without-targets"}
    elif not bool(targets.all()):
        assert row_codes == {"row-without-targets"}
        assert set(by_code(findings)["row-without-targets"].rows) == set(
            (~targets).nonzero()[:, 0].tolist())
    else:
        assert not row_codes


@given(small_batches())
def test_findings_come_sorted_by_severity_and_nothing_is_changed(case):
    batch, pad, eos = case
    before = {key: value.clone() for key, value in batch.items()}
    findings = check_batch(batch, vocab_size=8, pad_token_id=pad, eos_token_id=eos,
                           placeholder_token_ids=[5])
    ranks = [f.severity.rank for f in findings]
    assert ranks == sorted(ranks, reverse=True)
    assert all(torch.equal(before[key], batch[key]) for key in batch)
    for finding in findings:
        assert (finding.severity, finding.link) == FINDING_CODES[finding.code]
        assert len(finding.positions) <= MAX_POSITIONS and len(finding.rows) <= MAX_POSITIONS


# ---------------------------------------------------------------------------
# Each check, both ways, on batches laid out by hand
# ---------------------------------------------------------------------------


def right_padded(lengths, *, total=None, vocab=20, pad=0):
    """Rows ``[1, 3, 4, ..., 2]`` (BOS, text, EOS), right-padded with ``pad``."""
    total = total or max(lengths)
    ids = torch.full((len(lengths), total), pad)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.arange(n) % (vocab - 4) + 3
        ids[row, 0], ids[row, n - 1] = 1, 2
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = torch.where(mask == 1, ids, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_a_correct_padded_batch_has_no_findings():
    batch = right_padded([5, 8, 3])
    assert check_batch(batch, vocab_size=20, pad_token_id=0, eos_token_id=2, micro_batch_size=3) == []
    assert format_findings(check_batch(batch)) == "no findings"


def test_labels_of_the_wrong_shape_or_dtype():
    batch = right_padded([5, 8])
    shape = check_batch({**batch, "labels": batch["labels"][:, 1:]})
    assert codes(shape) == ["labels-shape"]
    for dtype in (torch.int32, torch.int16):
        assert codes(check_batch({**batch, "labels": batch["labels"].to(dtype)})) == ["labels-dtype"]
    # uint8 cannot hold -100: here the padding became label 0 and is scored
    as_uint8 = check_batch({**batch, "labels": batch["labels"].clamp(min=0).to(torch.uint8)})
    assert codes(as_uint8) == ["labels-dtype", "padding-scored"]
    # float labels cannot be read as targets: only the dtype is reported
    assert codes(check_batch({**batch, "labels": batch["labels"].float()})) == ["labels-dtype"]
    # and the input ids are still checked
    bad_ids = {**batch, "input_ids": batch["input_ids"] + 100, "labels": batch["labels"][:, :3]}
    assert codes(check_batch(bad_ids, vocab_size=20)) == ["labels-shape", "input-id-out-of-range"]


def test_int32_labels_fail_in_pytorch_as_the_finding_says():
    logits = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="Long"):
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3, 0], dtype=torch.int32))
    with pytest.raises(IndexError):
        torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 5, 0]))


def test_labels_and_ids_out_of_range():
    batch = right_padded([5, 8])
    batch["labels"][1, 3] = 20
    batch["labels"][0, 0] = -1  # label 0 is never a target, but -1 still breaks cross_entropy
    found = by_code(check_batch(batch, vocab_size=20))
    assert found["label-out-of-range"].positions == ((0, 0), (1, 3))
    assert "input-id-out-of-range" not in found
    assert codes(check_batch(batch)) == ["label-out-of-range"]  # -1 is caught without V
    batch["input_ids"][1, 2] = 25
    assert by_code(check_batch(batch, vocab_size=20))["input-id-out-of-range"].positions == ((1, 2),)
    assert "label-out-of-range" not in codes(check_batch(right_padded([5]), vocab_size=20))


def test_scored_padding_both_sides():
    batch = right_padded([5, 8])
    batch["labels"] = batch["input_ids"].clone()  # padding labelled with the pad id
    found = by_code(check_batch(batch))
    assert found["padding-scored"].positions == ((0, 5), (0, 6), (0, 7))
    assert found["padding-scored"].count == 3
    # the first column is never a target, even when it is padding
    left = right_padded([3, 5])
    left["attention_mask"] = left["attention_mask"].flip(1)
    left["input_ids"] = left["input_ids"].flip(1)
    left["labels"] = torch.where(left["attention_mask"] == 1, left["input_ids"], IGNORE_INDEX)
    found = by_code(check_batch(left))
    assert "padding-scored" not in found
    assert found["target-after-padding"].positions == ((0, 2),)


def test_pad_equal_to_eos_with_every_eos_masked():
    batch = right_padded([5, 8], pad=2)
    batch["labels"] = torch.where(batch["input_ids"] == 2, IGNORE_INDEX, batch["input_ids"])
    found = by_code(check_batch(batch, pad_token_id=2, eos_token_id=2))
    assert found["eos-targets-masked"].positions == ((0, 4), (1, 7))
    # the same labels with pad != eos are not this pitfall
    assert "eos-targets-masked" not in codes(check_batch(batch, pad_token_id=0, eos_token_id=2))
    # one scored EOS in a row is enough for that row
    batch["labels"][1, 7] = 2
    assert by_code(check_batch(batch, pad_token_id=2, eos_token_id=2))["eos-targets-masked"].positions == ((0, 4),)
    # without an attention mask, trailing pad = eos tokens count as possible ends
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert by_code(check_batch(no_mask, pad_token_id=2, eos_token_id=2))["eos-targets-masked"].count == 4


def test_a_chat_format_that_masks_user_turn_ends_is_not_flagged():
    # pad = eos = 2 ends every turn; the user's turn end is masked, the answer's is scored
    ids = torch.tensor([[1, 5, 6, 2, 7, 8, 2, 2]])
    labels = torch.tensor([[-100, -100, -100, -100, 7, 8, 2, -100]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    assert check_batch(batch, pad_token_id=2, eos_token_id=2) == []


def test_placeholders_and_images():
    llava = build_llava_batch([2, 5, 3], [6, 2, 3], seed=0)
    clean = llava.model_inputs()
    ids = {"placeholder_token_ids": [tm.IMAGE_TOKEN_ID], "vocab_size": tm.VOCAB_SIZE}
    assert check_batch(clean, **ids) == []
    labelled = {**clean, "labels": torch.where(clean["attention_mask"] == 1, clean["input_ids"], IGNORE_INDEX)}
    found = by_code(check_batch(labelled, **ids))
    assert set(found) == {"placeholder-scored"}
    n_image = tm.image_token_count()
    assert found["placeholder-scored"].count == 3 * n_image
    # a label equal to the placeholder id is caught even where the input is not one
    moved = {**clean, "labels": clean["labels"].clone()}
    moved["labels"][0, -1] = tm.IMAGE_TOKEN_ID
    assert "placeholder-scored" in codes(check_batch(moved, **ids))
    # one image per placeholder run
    fewer = {**clean, "pixel_values": clean["pixel_values"][:2]}
    assert codes(check_batch(fewer, **ids)) == ["image-count-mismatch"]
    assert codes(check_batch(clean)) == ["placeholder-id-unknown"]
    text_only = {k: v for k, v in clean.items() if k != "pixel_values"}
    assert check_batch(text_only) == []


def test_packed_documents():
    ids = torch.tensor([[1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 2]])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3]])
    labels = ids.clone()
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    assert by_code(check_batch(batch))["packed-boundary-scored"].positions == ((0, 4), (0, 7))
    labels[0, [0, 4, 7]] = IGNORE_INDEX
    assert check_batch(batch) == []
    # positions that start at 2 (RoBERTa-style) restart the same way
    assert check_batch({**batch, "position_ids": positions + 2}) == []


def test_prompt_and_assistant_mask():
    ids = torch.tensor([[5, 6, 7, 8, 9, 2, 0], [5, 6, 8, 9, 2, 0, 0]])
    assistant = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0]])
    mask = (ids != 0).long()
    right = torch.where(assistant == 1, ids, IGNORE_INDEX)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": right, ASSISTANT_MASK_KEY: assistant}
    assert check_batch(batch) == []
    scored_prompt = {**batch, "labels": torch.where(mask == 1, ids, IGNORE_INDEX)}
    found = by_code(check_batch(scored_prompt))
    assert found["prompt-scored"].positions == ((0, 1), (0, 2), (1, 1))
    # the explicit argument wins over the batch key
    no_key = {k: v for k, v in scored_prompt.items() if k != ASSISTANT_MASK_KEY}
    assert check_batch(no_key) == []
    assert codes(check_batch(no_key, assistant_mask=assistant)) == ["prompt-scored"]
    short = {**batch, "labels": right.clone()}
    short["labels"][0, 5] = IGNORE_INDEX
    assert by_code(check_batch(short))["assistant-token-unscored"].positions == ((0, 5),)


def test_rows_and_batches_without_targets():
    batch = right_padded([5, 8, 3])
    batch["labels"][1, 1:] = IGNORE_INDEX
    found = by_code(check_batch(batch))
    assert found["row-without-targets"].rows == (1,) and found["row-without-targets"].count == 1
    batch["labels"][:, 1:] = IGNORE_INDEX
    assert codes(check_batch(batch)) == ["batch-without-targets"]
    # a single scored label in column 0 is still no target
    assert count_scored_targets(batch["labels"]) == 0


def test_micro_batch_imbalance_uses_the_weight_factors_of_chapter_5():
    batch = right_padded([3, 3, 17, 17])  # counts 2, 2, 16, 16 per row
    assert check_batch(batch, micro_batch_size=4) == []  # one micro-batch
    found = by_code(check_batch(batch, micro_batch_size=2))
    # micro-batches of 4 and 32 targets: f = 36 / (2 * 4) = 4.5
    assert "4.5 times" in found["micro-batch-imbalance"].message
    assert found["micro-batch-imbalance"].rows == (0, 1)
    balanced = right_padded([3, 17, 17, 3])
    assert check_batch(balanced, micro_batch_size=2) == []
    # the tolerance: counts 10 and 12 give f = 1.1 and 0.917
    near = right_padded([11, 13])
    assert check_batch(near, micro_batch_size=1, imbalance_tolerance=0.11) == []
    assert codes(check_batch(near, micro_batch_size=1, imbalance_tolerance=0.09)) == ["micro-batch-imbalance"]
    empty = right_padded([5, 5])
    empty["labels"][1, 1:] = IGNORE_INDEX
    found = by_code(check_batch(empty, micro_batch_size=1))
    assert "micro-batch 1 has none" in found["micro-batch-imbalance"].message


def test_tokenizer_ids_are_read_and_arguments_win():
    from companion.experiments.batch_check import bpe_tokenizer, language_model_batch

    tokenizer = bpe_tokenizer(pad_is_eos=True)
    batch = language_model_batch(tokenizer)
    assert codes(check_batch(batch, tokenizer=tokenizer)) == ["eos-targets-masked"]
    assert check_batch(batch, tokenizer=tokenizer, pad_token_id=0) == []
    # the model's vocabulary, when smaller than the tokenizer's, is what counts
    assert "input-id-out-of-range" in codes(check_batch(batch, tokenizer=tokenizer, vocab_size=10))


def test_positions_are_capped_and_counted():
    batch = right_padded([2, 30])
    batch["labels"] = batch["input_ids"].clone()
    finding = by_code(check_batch(batch, max_positions=3))["padding-scored"]
    assert finding.positions == ((0, 2), (0, 3), (0, 4)) and finding.count == 28
    assert "+25 more" in format_findings([finding])


def test_format_findings_is_a_table_with_the_links():
    batch = right_padded([3, 9])
    batch["labels"] = batch["input_ids"].clone()
    text = format_findings(check_batch(batch), width=60)
    assert text.splitlines()[0].split() == ["severity", "code", "where"]
    assert "padding-scored" in text and "see book/02_llava_loss.html#llava-attention-filter" in text
    assert all(len(line) <= 60 for line in text.splitlines() if "see book/" not in line)


def test_a_large_batch_gives_the_counts_of_its_parts():
    # not a timing test (benchmarks/batch_check.py times it): the answer at
    # B x T = 64 x 4096 equals the answer on the same rows one at a time
    from companion.experiments.batch_check import benchmark_batch

    batch = benchmark_batch(64, 4096)
    batch["labels"] = batch["input_ids"].clone()
    whole = by_code(check_batch(batch, pad_token_id=0, eos_token_id=2, vocab_size=32000,
                                placeholder_token_ids=[tm.IMAGE_TOKEN_ID]))
    counts = defaultdict(int)
    for row in range(0, 64, 16):
        piece = {key: value[row : row + 16] for key, value in batch.items()}
        for finding in check_batch(piece, pad_token_id=0, eos_token_id=2, vocab_size=32000,
                                   placeholder_token_ids=[tm.IMAGE_TOKEN_ID]):
            counts[finding.code] += finding.count
    assert {code: f.count for code, f in whole.items()} == dict(counts)
    assert {"padding-scored", "placeholder-scored", "packed-boundary-scored", "prompt-scored"} <= set(whole)


# ---------------------------------------------------------------------------
# The model's loss
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting_batch():
    ids, labels = make_counting_batch([3, 9, 20, 6], vocab_size=24, seed=0)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tm.tiny_llama_config()).eval()


def test_check_loss_is_clean_on_the_book_s_tiny_models(counting_batch, tiny_llama):
    llava = build_llava_batch([2, 5, 3], [6, 2, 3], seed=0)
    assert check_loss(tm.tiny_llava(), llava.model_inputs()) == []
    assert check_loss(tiny_llama, counting_batch, micro_batch_size=3) == []
    assert check_loss(tm.tiny_gpt_bigcode(), counting_batch) == []


def test_check_loss_on_a_model_without_loss_or_loss_kwargs(counting_batch):
    tiny = tm.build_tiny_lm(seed=0)
    assert codes(check_loss(tiny, counting_batch)) == ["model-computes-no-loss"]
    assert not accepts_loss_kwargs(tiny)
    found = by_code(check_loss(MeanLossModel(tiny), counting_batch))
    assert set(found) == {"micro-batch-mismatch", "no-loss-kwargs"}
    # with equal counts per micro-batch the mean of means is exact
    ids, labels = make_counting_batch([6, 6, 6, 6], vocab_size=24, seed=0)
    equal = {"input_ids": ids, "labels": labels}
    assert codes(check_loss(MeanLossModel(tiny), equal)) == ["no-loss-kwargs"]


class DividesByPositions(torch.nn.Module):
    """Sums the next-token losses and divides by every position, padding too."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.inner(input_ids)
        total = label_padding_loss(logits, labels, num_items_in_batch=1)
        return {"logits": logits, "loss": total / (labels.shape[0] * (labels.shape[1] - 1))}


class Unshifted(torch.nn.Module):
    """Pairs each position with its own label, as an encoder-decoder does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, labels=None, **kwargs):
        logits = self.inner(input_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"logits": logits, "loss": loss}


def test_check_loss_finds_a_wrong_denominator_and_a_missing_shift(counting_batch):
    tiny = tm.build_tiny_lm(seed=0)
    found = by_code(check_loss(DividesByPositions(tiny), counting_batch))
    assert {"loss-reference-mismatch", "padding-changes-loss"} <= set(found)
    assert "no-loss-kwargs" not in found
    assert "loss-reference-mismatch" in codes(check_loss(Unshifted(tiny), counting_batch))


def test_check_loss_restores_the_mode_and_leaves_grad_alone(counting_batch, tiny_llama):
    tiny_llama.train()
    before = [p.grad for p in tiny_llama.parameters()]
    check_loss(tiny_llama, counting_batch)
    assert tiny_llama.training and [p.grad for p in tiny_llama.parameters()] == before
    tiny_llama.eval()


def test_check_loss_refuses_a_batch_with_nothing_to_score(counting_batch, tiny_llama):
    empty = {**counting_batch, "labels": torch.full_like(counting_batch["labels"], IGNORE_INDEX)}
    with pytest.raises(ValueError, match="^labels must hold at least one scored target"):
        check_loss(tiny_llama, empty)


def _trainer(model, tmp_path, accumulation_steps):
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True,
        gradient_accumulation_steps=accumulation_steps,
    )
    trainer = Trainer(model=model, args=arguments)
    trainer.current_gradient_accumulation_steps = accumulation_steps
    return trainer


class NamesNumItems(torch.nn.Module):
    """Names ``num_items_in_batch`` but takes no ``**kwargs``."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def forward(self, input_ids, labels=None, num_items_in_batch=None):
        return self.layer(input_ids)


def test_accepts_loss_kwargs_is_the_trainer_s_own_decision(tmp_path, tiny_llama):
    models = [tiny_llama, tm.tiny_llava(), MeanLossModel(tm.build_tiny_lm()), NamesNumItems()]
    for model in models:
        trainer = _trainer(model, tmp_path, 1)
        assert accepts_loss_kwargs(model) == trainer.model_accepts_loss_kwargs, type(model).__name__
    assert [accepts_loss_kwargs(m) for m in models] == [True, True, False, False]


@pytest.mark.parametrize("kind", ["llama", "mean loss"])
def test_check_loss_predicts_what_the_trainer_s_accumulation_does(kind, tmp_path, counting_batch, tiny_llama):
    """The Trainer's own training_step over micro-batches, against the full batch."""
    if kind == "llama":
        model, batch = tiny_llama, counting_batch
    else:  # its forward takes input_ids and labels only, as the Trainer will pass them
        model = MeanLossModel(tm.build_tiny_lm(seed=0, dtype=torch.float32))
        batch = {k: v for k, v in counting_batch.items() if k != "attention_mask"}
    rows, size = batch["input_ids"].shape[0], 1
    trainer = _trainer(model, tmp_path, rows // size)
    total = count_scored_targets(batch["labels"])
    model.zero_grad(set_to_none=True)
    reported = sum(
        float(trainer.training_step(model, {k: v[r : r + size] for k, v in batch.items()},
                                    num_items_in_batch=total))
        for r in range(0, rows, size)
    )
    accumulated = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out["loss"].backward()
    full = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    model.eval()
    trainer_exact = abs(reported - out["loss"].item()) < 1e-4 and float(
        (accumulated - full).norm() / full.norm()) < 1e-4
    predicted_exact = "micro-batch-mismatch" not in codes(
        check_loss(model, batch, micro_batch_size=size))
    assert trainer_exact == predicted_exact == (kind == "llama")


# ---------------------------------------------------------------------------
# Files: untrusted input
# ---------------------------------------------------------------------------


def test_a_torch_save_batch_round_trips(tmp_path):
    batch = right_padded([3, 5])
    for name, options in {"new.pt": {}, "legacy.pt": {"_use_new_zipfile_serialization": False}}.items():
        torch.save(batch, tmp_path / name, **options)
        loaded = load_batch(tmp_path / name)
        assert set(loaded) == set(batch) and all(torch.equal(loaded[k], batch[k]) for k in batch)
    assert load_batch(str(tmp_path / "new.pt")).keys() == batch.keys()


def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    write_code_running_pickle(path, marker)
    with pytest.raises(ValueError, match=r"^path .*evil\.pt holds more than tensors") as info:
        load_batch(path)
    assert "refused without running it" in str(info.value)
    assert not marker.exists()
    # the file is dangerous: an unsafe load runs it
    with open(path, "rb") as handle:
        pickle.load(handle)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_foreign_object_is_refused_whatever_the_pickle_protocol(tmp_path, protocol):
    path = tmp_path / "batch.pt"
    content = {"input_ids": torch.zeros(1, 2), "note": Finding(Severity.INFO, "code", "message")}
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=protocol)
    with pytest.raises(ValueError, match="refused without running it"):
        load_batch(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ({"input_ids": torch.ones(1, 2), "meta": "text"}, "non-tensor value under 'meta'"),
        ({"input_ids": torch.ones(1, 2), "nested": {"a": torch.ones(1)}}, "non-tensor value under 'nested'"),
        ({"input_ids": [torch.ones(1, 2)]}, "non-tensor value under 'input_ids'"),
        (torch.ones(2, 3), "holds a Tensor, not a dict of tensors"),
        ([torch.ones(2, 3)], "holds a list, not a dict of tensors"),
        ({1: torch.ones(1, 2)}, "key 1 that is not a string"),
    ],
)
def test_non_tensor_content_is_refused(tmp_path, content, problem):
    torch.save(content, tmp_path / "batch.pt")
    with pytest.raises(ValueError, match=r"^path \S*batch\.pt") as info:
        load_batch(tmp_path / "batch.pt")
    assert problem in str(info.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_truncated_file_is_refused(tmp_path, legacy):
    path = tmp_path / "batch.pt"
    torch.save(right_padded([3, 5]), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"^path \S*batch\.pt is truncated or not a torch.save file"):
        load_batch(path)


def test_missing_empty_and_odd_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="^path .* does not exist"):
        load_batch(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="is not a file"):
        load_batch(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        load_batch(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a batch at all")
    with pytest.raises(ValueError, match="not a torch.save file"):
        load_batch(tmp_path / "junk.pt")


def test_json_lines_are_padded_and_labelled(tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_text('{"input_ids": [1, 5, 6, 2]}\n\n{"input_ids": [1, 7, 2]}\n')
    batch = load_batch(path, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 9]]
    assert batch["labels"].tolist() == [[1, 5, 6, 2], [1, 7, 2, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert all(value.dtype == torch.int64 for value in batch.values())
    path.write_text('{"input_ids": [1, 5], "labels": [-100, 5], "position_ids": [0, 1]}\n'
                    '{"input_ids": [1, 5], "labels": [-100, 5], "position_ids": [0, 1]}\n')
    batch = load_batch(path)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # equal lengths: no mask added


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n', "line 2: not valid JSON"),
        ('{"input_ids": [1, 2]}\n[1, 2]\n', "line 2: expected a JSON object"),
        ('{"labels": [1, 2]}\n', "line 1: no 'input_ids'"),
        ('{"input_ids": [1, 2.5]}\n', "line 1: 'input_ids' must be a non-empty list of integers"),
        ('{"input_ids": [true, 2]}\n', "'input_ids' must be a non-empty list of integers"),
        ('{"input_ids": []}\n', "'input_ids' must be a non-empty list of integers"),
        ('{"input_ids": [1, 2], "labels": [1]}\n', "line 1: 'labels' has 1 entries"),
        ('{"input_ids": [1, 2], "pixel_values": [[0.5]]}\n', "'pixel_values' must be a non-empty list"),
        ('{"input_ids": [1, 2]}\n{"input_ids": [1, 2], "labels": [1, 2]}\n', "line 2: keys"),
        ('{"input_ids": [1, 99999999999999999999999]}\n', "does not fit in int64"),
    ],
)
def test_malformed_json_lines_are_refused_with_the_line(tmp_path, text, problem):
    path = tmp_path / "batch.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"^path \S*batch\.jsonl") as info:
        load_batch(path)
    assert problem in str(info.value)


def test_json_lines_that_are_not_utf8_are_refused(tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_bytes(b'{"input_ids": [1, 2]}\n{"x": "\xff"}\n')
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_batch(path)


# ---------------------------------------------------------------------------
# On a GPU (skipped without one)
# ---------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_out_of_range_labels_trigger_a_device_side_assert_on_a_gpu():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "logits = torch.zeros(2, 4, device='cuda')\n"
        "torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "device-side assert" in done.stderr


@needs_cuda
def test_both_checks_run_on_gpu_tensors():
    batch = {key: value.cuda() for key, value in right_padded([3, 9]).items()}
    batch["labels"] = batch["input_ids"].clone()
    on_gpu = check_batch(batch, micro_batch_size=1)
    on_cpu = check_batch({key: value.cpu() for key, value in batch.items()}, micro_batch_size=1)
    assert on_gpu == on_cpu and codes(on_gpu) == ["padding-scored", "micro-batch-imbalance"]
    llava = build_llava_batch([2, 5, 3], [6, 2, 3], seed=0)
    inputs = {key: value.cuda() for key, value in llava.model_inputs().items()}
    assert check_loss(tm.tiny_llava().cuda(), inputs) == []
