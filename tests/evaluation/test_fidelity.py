import json

import pytest

from tests.helpers import STORIES, WIKITEXT
from transformers_kvquant.cli import main as cli
from transformers_kvquant.evaluation.fidelity import (
    CacheMethod,
    documents_from_text,
    evaluate_fidelity,
)
from transformers_kvquant.evaluation.simulation import IntMethod


def test_fidelity_buckets_kl_and_agreement(stories):
    model, tok = stories
    text = open(WIKITEXT).read()[:40000]
    docs = documents_from_text(tok, text, 256, 2)
    cfg16 = CacheMethod("exact", {"bits": 16})
    cfg2 = CacheMethod("nuq2-1%", {"bits": 2, "outlier_fraction": 0.01})
    sim = IntMethod(2)
    sim.name = "int2 (simulated)"
    res = evaluate_fidelity(model, docs, [cfg16, cfg2, sim], chunk=64, bucket=128, progress=False)
    assert res["documents"] == 2 and set(res["methods"]) == {"fp", "exact", "nuq2-1%", "int2 (simulated)"}
    exact = res["methods"]["exact"]["buckets"]
    assert [b["start"] for b in exact] == [0, 128] and sum(b["tokens"] for b in exact) == 2 * 255
    # bits=16 runs the same chunks through the KVQuant path: identical distributions.
    assert all(abs(b["kl"]) < 1e-6 and b["top1"] == 1.0 for b in exact)
    fp = res["methods"]["fp"]["buckets"]
    assert all(a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) for a, b in zip(fp, exact))
    q = res["methods"]["nuq2-1%"]
    assert all(b["kl"] > 1e-4 and b["top1"] < 1.0 for b in q["buckets"]) and q["avg_bits"] < 16
    assert res["methods"]["int2 (simulated)"]["simulated"] is True


def test_documents_need_enough_text(stories):
    _, tok = stories
    with pytest.raises(ValueError, match="--documents 50 needs"):
        documents_from_text(tok, "short text " * 50, 256, 50)


def test_cli_eval_fidelity(tmp_path):
    out = tmp_path / "f.json"
    code = cli(["eval-fidelity", str(STORIES), "--dataset", str(WIKITEXT), "--context", "192", "--chunk", "64",
                "--documents", "1", "--bucket", "64", "--bits", "4", "--no-baselines", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert {"nuq4", "nuq4-1%", "fp"} <= set(data["methods"])
    assert len(data["methods"]["nuq4"]["buckets"]) == 3
    for b in data["methods"]["nuq4"]["buckets"]:
        assert {"start", "end", "kl", "top1", "ppl"} <= set(b)


def test_cli_eval_fidelity_rejects_long_context(capsys):
    assert cli(["eval-fidelity", str(STORIES), "--dataset", str(WIKITEXT), "--context", "4096"]) == 2
    assert "longer than the model's 512 positions" in capsys.readouterr().err
