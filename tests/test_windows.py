"""One windowing engine for both representations: token ids and bag-of-words CSR rows are cut into the same rows,
groups and lengths for the same settings, on 1-4 DDP ranks, with micro-batch sizes that do and don't divide."""

import itertools

import numpy as np
import pytest
import torch
from scipy import sparse

from lm_lightning.data import BagRows, Batch, StreamWindows, TokenRows
from lm_lightning.errors import LMInputError

VOCAB = 1000


def same_rows_both_ways(length: int, seed: int) -> tuple[TokenRows, BagRows]:
    """Token ids ``t_i`` and bags whose row ``i`` is the single word ``t_i`` (weights differ: see the divisor test)."""
    ids = np.random.default_rng(seed).integers(0, VOCAB, length).astype(np.int32)
    counts = sparse.csr_matrix((np.ones(length, np.float32), ids, np.arange(length + 1)), shape=(length, VOCAB))
    return TokenRows(ids), BagRows(counts)


def as_token_ids(batch_part) -> torch.Tensor:
    """A ``Bags`` grid of one-word rows back to its ``(streams, time)`` token ids."""
    return batch_part.indices.long().view(batch_part.streams, -1)


SETTINGS = [
    (length, batch_size, bptt, world, micro)
    for length, batch_size, bptt, world in [(241, 4, 5, 1), (241, 4, 7, 2), (300, 6, 4, 3), (211, 2, 3, 4), (200, 4, 35, 1)]
    for micro in (None, *range(1, batch_size + 1))
]


@pytest.mark.parametrize("length, batch_size, bptt, world, micro", SETTINGS)
def test_tokens_and_bags_give_the_same_windows_on_every_rank(length, batch_size, bptt, world, micro):
    tokens, bags = same_rows_both_ways(length, seed=length + bptt)
    if micro is not None and batch_size % micro:
        for rows in (tokens, bags):  # not dividing is the same one-sentence error for both representations
            with pytest.raises(LMInputError, match=rf"micro_batch_size must divide batch_size \({batch_size}\), got {micro}"):
                StreamWindows(rows, batch_size, bptt, 0, world, micro_batch_size=micro)
        return
    streams_seen = []
    lengths = set()
    for rank in range(world):
        token_windows = StreamWindows(tokens, batch_size, bptt, rank, world, micro_batch_size=micro)
        bag_windows = StreamWindows(bags, batch_size, bptt, rank, world, micro_batch_size=micro)
        token_batches, bag_batches = list(token_windows), list(bag_windows)
        assert len(token_windows) == len(bag_windows) == len(token_batches) == len(bag_batches)
        lengths.add(len(token_windows))
        for t, b in zip(token_batches, bag_batches):
            assert (t.first_stream, t.num_streams, t.length, t.num_items) == (b.first_stream, b.num_streams, b.length, b.num_items)
            assert t.num_streams == (micro or batch_size) and t.inputs.shape == (t.num_streams, t.length)
            assert torch.equal(as_token_ids(b.inputs), t.inputs) and torch.equal(as_token_ids(b.targets), t.targets)
            assert t.divisor == b.divisor  # one word per bag: the same weights
        # The groups of a window cover its streams in order; the first window starts each of this rank's streams.
        groups = token_batches[: batch_size // (micro or batch_size)]
        assert [g.first_stream for g in groups] == list(range(0, batch_size, micro or batch_size))
        first_rows = token_windows.grid(0, 1)[:, 0]
        assert torch.equal(torch.cat([g.inputs[:, 0] for g in groups]), torch.from_numpy(tokens.ids[first_rows]).long())
        streams_seen.append(first_rows)
    assert len(lengths) == 1  # every rank has the same number of batches: none waits at the end of an epoch
    rows = np.concatenate(streams_seen)
    assert len(set(rows.tolist())) == len(rows) == batch_size * world  # ranks read disjoint streams


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_a_window_is_every_row_once_and_the_group_losses_average_to_the_window_loss(micro):
    """Bags of uneven sizes: the groups of a window hold different numbers of words, and still the mean of their
    losses (what Lightning's accumulation takes) is the whole window's per-word loss."""
    rng = np.random.default_rng(0)
    counts = sparse.random(120, 50, density=0.1, format="csr", random_state=1, data_rvs=lambda n: rng.integers(1, 4, n))
    counts = counts[np.asarray(counts.sum(axis=1)).ravel() > 0].astype(np.float32)
    rows = BagRows(counts)
    per_row_loss = rng.random(len(rows))  # a stand-in for each target row's summed negative log-likelihood

    def loss(batch: Batch, grid: np.ndarray) -> float:
        return per_row_loss[grid].sum() / batch.divisor

    whole = StreamWindows(rows, 4, 6)
    split = StreamWindows(rows, 4, 6, micro_batch_size=micro)
    whole_batches, split_batches = list(whole), list(split)
    assert len(split_batches) == len(whole_batches) * (4 // micro)
    window_targets = [whole.grid(s + 1, s + 1 + b.length) for s, b in zip(range(0, whole.length - 1, 6), whole_batches)]
    for k, (batch, targets) in enumerate(zip(whole_batches, window_targets)):
        groups = split_batches[k * (4 // micro) : (k + 1) * (4 // micro)]
        group_losses = [loss(g, targets[g.first_stream : g.first_stream + g.num_streams]) for g in groups]
        assert np.mean(group_losses) == pytest.approx(loss(batch, targets), rel=1e-12)
        assert batch.divisor == pytest.approx(float(counts[targets.reshape(-1)].sum()))
    # Every target row of every stream exactly once over the epoch; the divisors add up to what perplexity averages over.
    seen = np.concatenate([t.reshape(-1) for t in window_targets])
    assert sorted(seen.tolist()) == sorted(whole.grid(1).reshape(-1).tolist())
    assert sum(b.divisor for b in whole_batches) == pytest.approx(whole.num_targets)


def test_a_split_too_short_for_one_window_names_the_flag_and_the_unit():
    tokens, bags = same_rows_both_ways(20, seed=0)
    for rows, unit in ((tokens, "tokens"), (bags, "non-empty segments")):
        with pytest.raises(LMInputError, match=rf"The valid split has 20 {unit}, .* 2 x 2 x 6 = 24\): lower --data.eval_batch_size"):
            StreamWindows(rows, 2, 5, world_size=2, split="valid")


def test_a_micro_batch_schedule_is_read_at_every_epoch():
    tokens, _ = same_rows_both_ways(200, seed=3)
    sizes = itertools.cycle([None, 2, 1])
    current = {"size": None}
    windows = StreamWindows(tokens, 4, 10, micro_batch_size=lambda: current["size"])
    for _ in range(3):
        current["size"] = next(sizes)
        batches = list(windows)
        assert len(windows) == len(batches) == 5 * (4 // (current["size"] or 4))
        assert {b.num_streams for b in batches} == {current["size"] or 4}
