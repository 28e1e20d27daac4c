import json

import pytest
import torch

from tests.helpers import C4, STORIES
from transformers_kvquant.calibration import calibration_windows, collect_statistics
from transformers_kvquant.calibration.fit import _percentile
from transformers_kvquant.cli import main as cli
from transformers_kvquant.config import KVQuantConfig
from transformers_kvquant.config.calibrate import calibrate, fit_config
from transformers_kvquant.evaluation.datasets import default_calibration_path, load_text


@pytest.fixture(scope="module")
def stories_stats(stories):
    model, tok = stories
    text = load_text(default_calibration_path())
    samples = calibration_windows(tok, text, nsamples=4, seqlen=128, seed=0)
    return samples, collect_statistics(model, samples, progress=False)


def test_statistics_shapes_and_gradients(stories, stories_stats):
    model, _ = stories
    samples, stats = stories_stats
    assert stats.num_layers == model.config.num_hidden_layers
    c = model.config.num_key_value_heads * model.config.head_dim
    for t in stats.keys + stats.key_grads + stats.values + stats.value_grads:
        assert t.shape == (4, 128, c) and t.dtype == torch.float32
    assert all(g.abs().sum() > 0 for g in stats.key_grads + stats.value_grads)
    # The recorded keys are the k_proj outputs (pre-RoPE), not rotated ones.
    with torch.no_grad():
        h = model.model.embed_tokens(samples[:1])
        h = model.model.layers[0].input_layernorm(h)
        k0 = model.model.layers[0].self_attn.k_proj(h)[0]
    torch.testing.assert_close(stats.keys[0][0], k0)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_gradients_match_autograd_of_the_loss(stories):
    model, tok = stories
    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_statistics(model, ids, progress=False)
    # Finite-difference check of one key gradient element through a forward hook.
    layer, t, ch = 2, 10, 5
    eps = 1e-3

    def loss_with(delta):
        def hook(mod, inp, out):
            out = out.clone()
            out[0, t, ch] += delta
            return out

        h = model.model.layers[layer].self_attn.k_proj.register_forward_hook(hook)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss
        h.remove()
        return float(loss)

    numeric = (loss_with(eps) - loss_with(-eps)) / (2 * eps)
    assert abs(numeric - float(stats.key_grads[layer][0, t, ch])) < 1e-3 + 0.02 * abs(numeric)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_fit_config_codebooks_and_ranges(stories_stats, bits):
    _, stats = stories_stats
    cfg = fit_config(stats, bits=bits, outlier_fraction=0.01, progress=False)
    assert cfg.bits == bits and cfg.qnorm == (bits == 2)
    for layer in cfg.layers:
        for book in (layer.key_codebook, layer.value_codebook):
            c = book.centroids
            assert c.numel() == 2**bits and (c[1:] > c[:-1]).all() and c.abs().max() <= 1.0 + 1e-6
    # Key ranges are the 0.5 / 99.5 percentiles of the non-sink keys of each channel.
    keys = stats.keys[0][:, 1:].reshape(-1, stats.keys[0].shape[-1])
    hi, lo = keys.quantile(0.995, dim=0), keys.quantile(0.005, dim=0)
    torch.testing.assert_close(cfg.layers[0].key_zero.flatten(), (hi + lo) / 2)
    torch.testing.assert_close(cfg.layers[0].key_scale.flatten(), (hi - lo) / 2)


def test_no_outliers_uses_min_max(stories_stats):
    _, stats = stories_stats
    cfg = fit_config(stats, bits=3, outlier_fraction=0.0, progress=False)
    keys = stats.keys[1][:, 1:].reshape(-1, stats.keys[1].shape[-1])
    torch.testing.assert_close(cfg.layers[1].key_zero.flatten(), (keys.amax(0) + keys.amin(0)) / 2)


def test_fisher_weighting_changes_codebooks_and_is_deterministic(stories_stats):
    _, stats = stories_stats
    a = fit_config(stats, bits=3, outlier_fraction=0.01, progress=False)
    b = fit_config(stats, bits=3, outlier_fraction=0.01, progress=False)
    plain = fit_config(stats, bits=3, outlier_fraction=0.01, fisher=False, progress=False)
    assert all(torch.equal(x.key_codebook.centroids, y.key_codebook.centroids) for x, y in zip(a.layers, b.layers))
    assert any(not torch.allclose(x.key_codebook.centroids, y.key_codebook.centroids, atol=1e-3) for x, y in zip(a.layers, plain.layers))
    assert plain.codebook_kind == "nuq-unweighted" and a.codebook_kind == "nuq"


def test_post_rope_ablation_calibrates_rotated_keys(stories_stats):
    _, stats = stories_stats
    pre = fit_config(stats, bits=3, outlier_fraction=0.01, progress=False)
    post = fit_config(stats, bits=3, outlier_fraction=0.01, key_rope="post", progress=False)
    assert post.key_rope == "post"
    assert not torch.allclose(pre.layers[0].key_scale, post.layers[0].key_scale)


def test_percentile_matches_torch_quantile():
    x = torch.randn(1001, 7)
    for q in (0.0, 0.005, 0.5, 0.995, 1.0):
        torch.testing.assert_close(_percentile(x, q), x.quantile(q, dim=0))


def test_calibrate_from_texts_and_ids(stories):
    model, tok = stories
    text = load_text(C4, slice(0, 40))
    cfg = calibrate(model, text, tokenizer=tok, bits=4, nsamples=2, seqlen=64, progress=False)
    ids = calibration_windows(tok, text, 2, 64, seed=0)
    cfg2 = calibrate(model, ids, bits=4, nsamples=2, seqlen=64, progress=False)
    assert torch.equal(cfg.layers[0].value_codebook.centroids, cfg2.layers[0].value_codebook.centroids)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(model, text, bits=4)


def test_calibrate_rejects_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    from transformers_kvquant import UnsupportedModelError

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="LLaMA"):
        collect_statistics(gpt2, torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_cli_calibrate_writes_a_loadable_config(tmp_path, capsys):
    out = tmp_path / "cfg"
    code = cli(["calibrate", str(STORIES), "--bits", "3", "--outliers", "0.01", "--nsamples", "2", "--seqlen", "64", "-o", str(out)])
    assert code == 0
    cfg = KVQuantConfig.from_pretrained(out)
    meta = json.loads((out / "kvquant_config.json").read_text())["calibration"]
    assert cfg.bits == 3 and meta["num_samples"] == 2 and meta["seqlen"] == 64 and "C4" in meta["dataset"]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "5"], "invalid choice"),
        (["--bits", "3", "--outliers", "0.9"], "--outliers"),
        (["--bits", "3", "--dataset", "/nonexistent/file.txt"], "not a file"),
        (["--bits", "3", "--seqlen", "100000"], "exceeds the model"),
    ],
)
def test_cli_calibrate_errors(tmp_path, capsys, args, message):
    try:
        code = cli(["calibrate", str(STORIES), *args, "-o", str(tmp_path / "x")])
    except SystemExit as e:  # argparse rejects invalid choices itself
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cli_calibrate_rejects_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    assert cli(["calibrate", str(STORIES), "--bits", "3", "--dataset", str(empty), "-o", str(tmp_path / "x")]) == 2
    assert "empty" in capsys.readouterr().err


def test_model_that_is_not_llama_is_rejected_by_cli(tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=512)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)
    assert cli(["calibrate", str(folder), "--bits", "3", "--nsamples", "1", "--seqlen", "32", "-o", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kvquant calibrate: error:")]
    assert len(errors) == 1 and "LLaMA" in errors[0]
