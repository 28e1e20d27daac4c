import torch

from transformers_kvquant.quant.codebook import (
    Codebook,
    qnorm_parameters,
    uniform_codebook,
)
from transformers_kvquant.quant.kmeans import weighted_kmeans_1d


def test_encode_picks_nearest_centroid():
    book = Codebook(torch.tensor([-1.0, -0.2, 0.1, 0.9]))
    x = torch.tensor([-5.0, -0.61, -0.59, -0.06, -0.04, 0.49, 0.51, 3.0])
    brute = (x[:, None] - book.centroids[None]).abs().argmin(1)
    assert book.encode(x).tolist() == brute.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_uniform_codebook_is_integer_grid():
    book = uniform_codebook(2)
    assert torch.allclose(book.centroids, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


def test_kmeans_recovers_separated_clusters_and_matches_bruteforce_objective():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([-0.8, -0.3, 0.2, 0.7])
    x = (true[torch.randint(0, 4, (20000,), generator=g)] + 0.02 * torch.randn(20000, generator=g)).clamp(-1, 1)
    c = weighted_kmeans_1d(x, None, 4)
    assert torch.allclose(c, true, atol=0.01)
    assert (c[1:] > c[:-1]).all()


def test_kmeans_weights_pull_centroids_and_unit_weights_equal_none():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5000, generator=g) * 2 - 1
    plain = weighted_kmeans_1d(x, None, 8)
    unit = weighted_kmeans_1d(x, torch.ones_like(x), 8)
    assert torch.allclose(plain, unit)
    w = torch.where(x > 0.5, 100.0, 1.0)
    weighted = weighted_kmeans_1d(x, w, 8)
    # Heavily weighted region gets more centroids.
    assert (weighted > 0.5).sum() > (plain > 0.5).sum()


def test_kmeans_is_deterministic_and_beats_uniform_on_skewed_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50000, generator=g).clamp(-3, 3) / 3
    a, b = weighted_kmeans_1d(x, None, 8, seed=3), weighted_kmeans_1d(x, None, 8, seed=3)
    assert torch.equal(a, b)
    def err(book):
        return ((x - book.snap(x)) ** 2).mean()
    assert err(Codebook(a)) < 0.7 * err(uniform_codebook(3))


def test_qnorm_restores_mean_and_std():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10000, generator=g) * 0.3).clamp(-1, 1)
    book = uniform_codebook(2)
    s, o = qnorm_parameters(x, book)
    snapped = book.snap(x) * s + o
    assert abs(float(snapped.mean() - x.mean())) < 1e-4
    assert abs(float(snapped.std() - x.std())) < 1e-4
