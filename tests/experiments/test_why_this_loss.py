"""Tests of companion.experiments.why_this_loss, chapter 3's opening.

The entropy rate, the probability of a text and the expected loss of a
bigram are checked against brute force over every short sequence; the
distribution helpers against PyTorch; the counted bigram against the
maximum-likelihood property it claims; the tokenizer comparison against the
invariance it is there to show; the worked example against the losses of
the package, PyTorch and transformers.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import IGNORE_INDEX
from companion.causal_lm_loss import count_scored_targets, label_padding_loss
from companion.experiments import why_this_loss as why


def small_chain(seed: int, vocab: int = 3) -> why.MarkovSource:
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.ones(vocab), size=vocab) + 1e-3
    transition /= transition.sum(axis=1, keepdims=True)
    return why.MarkovSource(tuple(f"w{i}" for i in range(vocab)), transition)


@st.composite
def distributions(draw, *, with_zeros: bool = True):
    size = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(size))
    if with_zeros and size > 1 and draw(st.booleans()):
        q[rng.integers(0, size)] = 0.0
        q /= q.sum()
    p = rng.dirichlet(np.ones(size)) + 1e-6
    return q, p / p.sum()


# ---------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------


@given(distributions())
def test_entropy_cross_entropy_and_kl_match_torch(pair):
    q, p = pair
    target = torch.from_numpy(q)
    log_p = torch.log(torch.from_numpy(p))
    assert abs(why.entropy(q) - torch.distributions.Categorical(probs=target).entropy().item()) < 1e-12
    assert abs(why.cross_entropy_of(q, p) - F.cross_entropy(log_p[None], target[None]).item()) < 1e-12
    assert abs(why.kl_divergence(q, p) - F.kl_div(log_p, target, reduction="sum").item()) < 1e-12
    assert abs(why.cross_entropy_of(q, p) - why.entropy(q) - why.kl_divergence(q, p)) < 1e-12
    assert why.kl_divergence(q, p) >= -1e-15 and abs(why.kl_divergence(q, q)) < 1e-15


def test_distribution_helpers_work_row_wise_and_reject_non_distributions():
    rows = np.array([[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(why.entropy(rows), [math.log(2), 0.0], rtol=0, atol=1e-15)
    assert why.cross_entropy_of([1.0, 0.0], [0.0, 1.0]) == math.inf
    for bad in ([0.5, 0.6], [-0.1, 1.1], [np.nan, 1.0], 1.0, []):
        with pytest.raises(ValueError, match="^q"):
            why.entropy(bad)


# ---------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_entropy_rate_is_the_entropy_per_token_of_every_sequence(seed):
    # For a stationary chain H(X_0..X_{T-1}) = H(pi) + (T - 1) H_rate: check it
    # by enumerating every sequence, with its probability from nll.
    chain = small_chain(seed)
    for length in (2, 3, 4):
        joint = 0.0
        for ids in itertools.product(range(chain.vocab_size), repeat=length):
            log_p = -chain.nll(np.array(ids))
            joint -= math.exp(log_p) * log_p
        expected = why.entropy(chain.stationary) + (length - 1) * chain.entropy_rate
        assert abs(joint - expected) < 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_expected_loss_is_the_entropy_rate_plus_the_kl(seed):
    chain = small_chain(seed)
    rng = np.random.default_rng(seed + 10)
    table = np.log(rng.dirichlet(np.ones(chain.vocab_size), size=chain.vocab_size))
    assert abs(chain.expected_loss(table) - chain.entropy_rate - chain.expected_kl(table)) < 1e-12
    assert chain.expected_kl(table) > 0
    assert abs(chain.expected_loss(np.log(chain.transition)) - chain.entropy_rate) < 1e-12
    # the expected loss of a bigram, by brute force over the next word
    brute = sum(chain.stationary[i] * chain.transition[i, j] * -table[i, j]
                for i in range(chain.vocab_size) for j in range(chain.vocab_size))
    assert abs(chain.expected_loss(table) - brute) < 1e-12


def test_stationary_distribution_and_sampling():
    chain = why.word_chain()
    np.testing.assert_allclose(chain.stationary @ chain.transition, chain.stationary, atol=1e-12)
    ids = chain.sample(60_000, seed=3)
    assert ids.dtype == np.int64 and np.array_equal(ids, chain.sample(60_000, seed=3))
    frequencies = np.bincount(ids, minlength=chain.vocab_size) / len(ids)
    np.testing.assert_allclose(frequencies, chain.stationary, atol=0.01)
    after_the = ids[1:][ids[:-1] == 0]
    np.testing.assert_allclose(np.bincount(after_the, minlength=chain.vocab_size) / len(after_the),
                               chain.transition[0], atol=0.02)


def test_word_chain_follows_its_grammar():
    chain = why.word_chain(noise=0.05)
    index = {word: i for i, word in enumerate(chain.words)}
    assert chain.words == why.WORDS and "café" in chain.words
    for word, followers in why.LIKELY_NEXT_WORDS.items():
        for follower, probability in followers.items():
            expected = 0.95 * probability + 0.05 / chain.vocab_size
            assert abs(chain.transition[index[word], index[follower]] - expected) < 1e-15
    assert chain.entropy_rate < why.word_chain(noise=0.5).entropy_rate < math.log(chain.vocab_size)
    assert abs(why.word_chain(noise=1.0).entropy_rate - math.log(chain.vocab_size)) < 1e-12
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="^noise"):
            why.word_chain(noise=bad)


def test_source_rejects_a_chain_with_a_zero_or_a_wrong_shape():
    with pytest.raises(ValueError, match="^transition"):
        why.MarkovSource(("a", "b"), np.array([[1.0, 0.0], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="^transition"):
        why.MarkovSource(("a", "b", "c"), np.full((2, 2), 0.5))


def test_source_model_is_the_source_as_a_causal_lm():
    chain = why.word_chain()
    model = why.source_model(chain)
    ids = torch.from_numpy(chain.sample(300, seed=2))[None]
    with torch.no_grad():
        logits = model(ids)
        loss = label_padding_loss(logits, ids)
    np.testing.assert_allclose(torch.softmax(logits[0], -1).numpy(),
                               chain.transition[ids[0].numpy()], atol=1e-14)
    first = math.log(chain.stationary[ids[0, 0]])
    assert abs(-count_scored_targets(ids) * loss.item() - (-chain.nll(ids[0].numpy()) - first)) < 1e-9


# ---------------------------------------------------------------------------
# The bigram model and its training
# ---------------------------------------------------------------------------


def test_bigram_starts_uniform_draws_no_random_numbers_and_is_causal():
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    model = why.BigramLM(7)
    assert torch.equal(state, torch.random.get_rng_state())
    ids = torch.tensor([[1, 2, 3, 6, 0], [0, 0, 5, 4, 4]])
    assert model(ids).shape == (2, 5, 7) and model(ids).dtype == torch.float64
    assert abs(label_padding_loss(model(ids), ids).item() - math.log(7)) < 1e-15
    with torch.no_grad():
        model.next_token_logits.weight.normal_()
    assert torch.equal(model(ids), why.prefix_by_prefix_logits(model, ids))
    with pytest.raises(ValueError, match="^input_ids"):
        model(torch.tensor([[7]]))
    with pytest.raises(TypeError, match="^input_ids"):
        model(torch.tensor([[1.0]]))


def test_training_falls_towards_the_floor_and_restores_the_thread_count():
    chain = why.word_chain()
    model = why.BigramLM(chain.vocab_size)
    threads = torch.get_num_threads()
    history = why.train_bigram(model, chain.sample(4000, 0), chain.sample(2000, 1), steps=40, source=chain)
    assert torch.get_num_threads() == threads
    assert list(history.columns) == ["step", "train", "validation", "expected"]
    assert history["step"].tolist() == list(range(41))
    assert abs(history["train"].iloc[0] - math.log(chain.vocab_size)) < 1e-12
    assert history["train"].iloc[-1] < history["train"].iloc[0] - 1
    assert (history["expected"] > chain.entropy_rate).all()
    assert history["expected"].iloc[-1] < chain.entropy_rate + 0.05
    without = why.train_bigram(why.BigramLM(chain.vocab_size), chain.sample(500, 0),
                               chain.sample(500, 1), steps=2)
    assert "expected" not in without.columns
    with pytest.raises(TypeError, match="^model"):
        why.train_bigram(torch.nn.Linear(2, 2), [0, 1], [0, 1])
    with pytest.raises(ValueError, match="^train_ids"):
        why.train_bigram(model, [0, 10], [0, 1])


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_counting_is_the_maximum_likelihood_table(vocab, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, 200)
    initial, table = why.count_bigram(ids, vocab, alpha=1e-12)
    best = why.table_nll(initial, table, ids)
    # any other table (rows renormalised) gives the text a lower probability
    for _ in range(5):
        other = np.log(np.exp(table) + rng.uniform(0, 0.3, table.shape))
        other -= np.log(np.exp(other).sum(axis=1, keepdims=True))
        assert why.table_nll(initial, other, ids) >= best - 1e-9
    # and table_nll is the loop it says it is
    loop = -initial[ids[0]] - sum(table[a, b] for a, b in zip(ids[:-1], ids[1:]))
    assert abs(why.table_nll(initial, table, ids) - loop) < 1e-9


def test_count_bigram_smooths_and_checks():
    initial, table = why.count_bigram([0, 1, 0, 1], 3, alpha=0.5)
    np.testing.assert_allclose(np.exp(table).sum(axis=1), 1.0)
    assert abs(np.exp(table[0, 1]) - 2.5 / 3.5) < 1e-15 and np.exp(table[2]).tolist() == [1 / 3] * 3
    assert abs(np.exp(initial[2]) - 0.5 / 5.5) < 1e-15
    with pytest.raises(ValueError, match="^alpha"):
        why.count_bigram([0, 1], 2, alpha=0.0)
    with pytest.raises(ValueError, match="^ids"):
        why.count_bigram([0, 2], 2)
    with pytest.raises(TypeError, match="^ids"):
        why.count_bigram([0.0, 1.0], 2)


def test_generate_feeds_its_own_samples_back():
    chain = why.word_chain()
    model = why.source_model(chain)
    drawn = why.generate(model, 0, num_tokens=200, seed=4)
    assert drawn[0] == 0 and len(drawn) == 201 and drawn == why.generate(model, 0, 200, seed=4)
    # "on" is followed by "the" with probability 0.95 + 0.005
    after_on = [b for a, b in zip(drawn[:-1], drawn[1:]) if a == chain.words.index("on")]
    assert after_on and np.mean([b == 0 for b in after_on]) > 0.8


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def test_bpe_gives_back_the_text_and_characters_when_no_merge_fits():
    chain = why.word_chain()
    text = chain.text(chain.sample(2000, 0))
    alphabet = len(set(text.replace(" ", "▁")))
    chars = why.train_bpe(text, alphabet)
    assert chars.get_vocab_size() == alphabet
    encoded = chars.encode(text)
    assert len(encoded.ids) == len(text) and chars.decode(encoded.ids) == text
    words = why.train_bpe(text, 200)
    encoded = words.encode(text)
    assert len(encoded.ids) == len(text.split()) and words.decode(encoded.ids) == text


def test_tokenizer_comparison_shows_one_source_three_perplexities():
    chain = why.word_chain()
    train, validation = chain.sample(3000, 0), chain.sample(1000, 1)
    table = why.tokenizer_comparison(chain, train, validation, [15, 24, 64])
    text = chain.text(validation)
    total = chain.nll(validation)
    source = table["source"]
    np.testing.assert_allclose(source["bits per character"], total / (len(text) * math.log(2)), rtol=1e-12)
    np.testing.assert_allclose(source["bits per byte"], total / (len(text.encode()) * math.log(2)), rtol=1e-12)
    tokens = table[("tokenizer", "tokens")].to_numpy()
    np.testing.assert_allclose(source["perplexity"], np.exp(total / tokens), rtol=1e-12)
    assert tokens[0] == len(text) and tokens[-1] == len(validation)
    assert (np.diff(tokens) < 0).all() and source["perplexity"].is_monotonic_increasing
    np.testing.assert_allclose(table[("tokenizer", "characters per token")], len(text) / tokens)
    # the bigrams: different bits per character, each above the source's
    counted = table["bigram"]["bits per character"]
    assert (counted > source["bits per character"]).all() and counted.iloc[0] > counted.iloc[-1]


# ---------------------------------------------------------------------------
# The worked example and the batch helpers
# ---------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 9), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_words_first_table_gives_the_loss_of_every_implementation(time, vocab, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(1, time, vocab, dtype=torch.float64, generator=generator)
    input_ids = torch.randint(0, vocab, (1, time), generator=generator)
    labels = input_ids.clone()
    labels[torch.rand(1, time, generator=generator) < 0.4] = IGNORE_INDEX
    words = [f"w{c}" for c in range(vocab)]
    table = why.words_first_table(logits[0], input_ids[0], labels[0], words)
    assert len(table) == time - 1
    log_p = torch.log_softmax(logits[0, :-1], -1).gather(1, input_ids[0, 1:, None]).squeeze(1)
    np.testing.assert_allclose(table["-log p"], -log_p.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(table["p(next)"], log_p.exp().numpy(), rtol=0, atol=1e-12)
    assert table["scored"].tolist() == (labels[0, 1:] != IGNORE_INDEX).tolist()
    assert table["next word"].tolist() == [words[i] for i in input_ids[0, 1:].tolist()]
    if table["scored"].any():
        by_hand = table.loc[table["scored"], "-log p"].mean()
        assert abs(label_padding_loss(logits, labels).item() - by_hand) < 1e-12
        targets = labels[0, 1:]
        assert abs(F.cross_entropy(logits[0, :-1], targets).item() - by_hand) < 1e-12


def test_words_first_table_checks_its_shapes():
    with pytest.raises(ValueError, match="input_ids"):
        why.words_first_table(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long),
                              torch.zeros(3, dtype=torch.long), ["a", "b"])
    with pytest.raises(ValueError, match="^logits"):
        why.words_first_table(torch.zeros(3), torch.zeros(3, dtype=torch.long),
                              torch.zeros(3, dtype=torch.long), ["a"])


def test_pad_sentences():
    input_ids, labels = why.pad_sentences(["the cat", "the dog ran"], why.WORDS, padding_id=9)
    assert input_ids.tolist() == [[0, 1, 9], [0, 2, 4]]
    assert labels.tolist() == [[0, 1, IGNORE_INDEX], [0, 2, 4]]
    with pytest.raises(ValueError, match="^sentences"):
        why.pad_sentences(["the bird"], why.WORDS)
    with pytest.raises(TypeError, match="^sentences"):
        why.pad_sentences("the cat", why.WORDS)


def test_prefix_by_prefix_logits_equals_one_pass_for_a_transformers_model():
    from transformers import LlamaForCausalLM

    from companion.experiments.tiny_models import tiny_llama_config

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one_pass = model(input_ids=ids).logits
    prefixes = why.prefix_by_prefix_logits(lambda x: model(input_ids=x).logits, ids)
    assert prefixes.shape == one_pass.shape
    torch.testing.assert_close(prefixes, one_pass, rtol=0, atol=1e-5)
    # a model that looks ahead is caught: its prefix logits differ
    def peeking(x):
        return one_pass[:, : x.shape[1]] + x[:, -1:, None].double()
    assert not torch.allclose(why.prefix_by_prefix_logits(peeking, ids), peeking(ids))


# ---------------------------------------------------------------------------
# What the pinned transformers computes (the chapter's claims, in general)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaForCausalLM

    from companion.experiments.tiny_models import tiny_llama_config

    with torch.random.fork_rng():
        torch.manual_seed(1)
        return LlamaForCausalLM(tiny_llama_config(init_std=0.5)).eval()


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(2, 9), min_size=1, max_size=4), st.integers(0, 2**32 - 1),
       st.booleans())
def test_transformers_loss_is_the_token_mean_not_the_sequence_mean(llama, lengths, seed, mask_prompt):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b, length in enumerate(lengths):
        input_ids[b, :length] = torch.randint(3, 63, (length,), generator=generator)
        labels[b, :length] = input_ids[b, :length]
        if mask_prompt:
            labels[b, : length // 2] = IGNORE_INDEX
    attention_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    if (counts == 0).any():
        return
    with torch.no_grad():
        output = llama(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        per_token = torch.nn.functional.cross_entropy(
            output.logits[:, :-1].double().reshape(-1, output.logits.shape[-1]),
            labels[:, 1:].reshape(-1), reduction="none").view(len(lengths), -1)
        token_mean = per_token.sum() / counts.sum()
        sequence_mean = (per_token.sum(dim=1) / counts).mean()
        assert abs(output.loss.item() - token_mean.item()) < 1e-5 * token_mean.item()
        if abs(token_mean - sequence_mean) > 1e-3:
            assert abs(output.loss.item() - sequence_mean.item()) > 1e-4
        # with num_items_in_batch the model divides its sum by that count
        given = int(counts.sum()) + 3
        divided = llama(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        num_items_in_batch=torch.tensor(given)).loss
        assert abs(divided.item() - per_token.sum().item() / given) < 1e-5 * token_mean.item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_for_causal_lm_loss_computes_in_float32_whatever_the_logits(dtype):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    labels = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    loss = ForCausalLMLoss(logits, labels, vocab_size=7)
    assert loss.dtype == torch.float32
    expected = label_padding_loss(logits.double(), labels)
    assert abs(loss.item() - expected.item()) < 1e-5
