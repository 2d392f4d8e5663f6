"""Exact radix-select quantiles against torch.quantile, with and without multiplicities."""

import threading

import pytest
import torch

from megatron_rollout_is.core.quantiles import SORT_BELOW, exact_quantiles

QS = [0.0, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 2, 3, 17, 1000, 50_000])
def test_matches_torch_quantile(dtype, count):
    generator = torch.Generator().manual_seed(count)
    values = torch.exp(torch.randn(count, generator=generator, dtype=torch.float64) * 4).to(dtype)
    values[: count // 3] = 1.0  # ties
    values[count // 2 :: 7] = 0.0
    expected = torch.quantile(values.double(), torch.tensor(QS, dtype=torch.float64)).tolist()
    assert exact_quantiles(values, QS, count) == pytest.approx(expected, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("count", [40, 3 * SORT_BELOW])  # the sort path and the radix path
def test_multiplicities_equal_repeated_values(dtype, count):
    generator = torch.Generator().manual_seed(0)
    values = torch.rand(count, generator=generator, dtype=torch.float64).to(dtype) * 3
    values[::5] = 1.0  # ties across multiplicities
    multiplicity = torch.randint(1, 50, (count,), generator=generator).double()
    repeated = values.double().repeat_interleave(multiplicity.long())
    expected = torch.quantile(repeated, torch.tensor(QS, dtype=torch.float64)).tolist()
    got = exact_quantiles(values, QS, int(multiplicity.sum()), multiplicity=multiplicity)
    assert got == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_shares_reduced_by_a_sum_equal_the_whole():
    """Three "ranks" in threads, each round's histograms summed over the shares like an all-reduce."""
    generator = torch.Generator().manual_seed(1)
    whole = torch.exp(torch.randn(999, generator=generator))
    shares = whole.chunk(3)
    pending = [None] * 3
    barrier = threading.Barrier(3)

    def summing_reducer(index):
        def reduce(histogram):
            pending[index] = histogram.clone()
            barrier.wait()
            total = sum(pending)
            barrier.wait()
            return histogram.copy_(total)

        return reduce

    results = [None] * 3

    def run(index):
        results[index] = exact_quantiles(shares[index], QS, whole.numel(), summing_reducer(index))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = torch.quantile(whole.double(), torch.tensor(QS, dtype=torch.float64)).tolist()
    for result in results:
        assert result == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_no_values_gives_zeros_without_reducing():
    def never(_):
        raise AssertionError("no collective may run for an empty global set")

    assert exact_quantiles(torch.zeros(0), QS, 0, never) == [0.0] * len(QS)
