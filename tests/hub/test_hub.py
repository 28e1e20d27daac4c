"""Push and pull through the real huggingface_hub client: against the local Hub stand-in (tests/hub/hub_server.py),
from a huggingface_hub cache laid out on disk with HF_HUB_OFFLINE=1, and through the `kvquant` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers import REPO, STORIES
from tests.hub.common import lay_out_hub_cache, tiny_config
from tests.hub.hub_server import HubStandIn
from transformers_kvquant import KVQuantConfig, KVQuantConfigError
from transformers_kvquant.cli import main as cli_main
from transformers_kvquant.config import (
    CONFIG_NAME,
    TENSORS_NAME,
    ConfigNotFoundError,
    push_config,
)

MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (CONFIG_NAME, TENSORS_NAME)}


# ------------------------------------------------------------------------------------------------- API, stand-in
def test_push_then_pull_by_repo_id(hub, stories_config, saved):
    info = stories_config.push_to_hub("me/stories-kvquant")
    assert set(hub.files("me/stories-kvquant")) == {".gitattributes", CONFIG_NAME, TENSORS_NAME}
    assert hub.files("me/stories-kvquant")[CONFIG_NAME] == (saved / CONFIG_NAME).read_bytes()
    assert info.oid == hub.repos["me/stories-kvquant"].refs["main"]
    assert "nuq3-1%" in hub.repos["me/stories-kvquant"].commits[info.oid].message

    loaded = KVQuantConfig.from_pretrained("me/stories-kvquant")
    assert loaded == stories_config
    # It came through huggingface_hub's cache, from the pushed commit.
    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / "models--me--stories-kvquant" / "snapshots" / info.oid
    assert files_of(cached) == files_of(saved)


def test_push_into_an_existing_model_repo_touches_nothing_else(hub, stories_config):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("me/stories260K")
    api.upload_folder(repo_id="me/stories260K", folder_path=STORIES, allow_patterns=MODEL_FILES)
    before = dict(hub.files("me/stories260K"))
    assert set(MODEL_FILES) <= set(before)

    pr = stories_config.push_to_hub("me/stories260K", create_pr=True)
    assert hub.files("me/stories260K") == before  # the PR leaves main alone
    assert pr.pr_url.endswith("/discussions/1")
    in_pr = hub.files("me/stories260K", "refs/pr/1")
    assert {k: v for k, v in in_pr.items() if k in before} == before and set(in_pr) - set(before) == {CONFIG_NAME, TENSORS_NAME}

    stories_config.push_to_hub("me/stories260K")
    after = hub.files("me/stories260K")
    assert {k: after[k] for k in before} == before  # config.json and the weights are byte-identical
    assert set(after) - set(before) == {CONFIG_NAME, TENSORS_NAME}
    assert KVQuantConfig.from_pretrained("me/stories260K") == stories_config


def test_branch_subfolder_and_commit_revisions(hub, stories_config):
    two_bit = tiny_config(0, bits=2)
    first = stories_config.push_to_hub("me/configs", path_in_repo="stories")
    second = two_bit.push_to_hub("me/configs", revision="experiments", path_in_repo="stories", commit_message="try 2 bits")
    assert hub.repos["me/configs"].commits[second.oid].message == "try 2 bits"
    assert KVQuantConfig.from_pretrained("me/configs", subfolder="stories") == stories_config
    assert KVQuantConfig.from_pretrained("me/configs", revision="experiments", subfolder="stories") == two_bit
    assert KVQuantConfig.from_pretrained("me/configs", revision=first.oid, subfolder="stories") == stories_config


def test_push_validates_before_sending(hub, saved):
    (saved / TENSORS_NAME).write_bytes((saved / TENSORS_NAME).read_bytes()[:-1])
    with pytest.raises(KVQuantConfigError) as info:
        push_config(saved, "me/never")
    assert info.value.field == "tensors.sha256"
    assert hub.log == [] and "me/never" not in hub.repos
    with pytest.raises(ValueError, match="create_pr"):
        push_config(saved, "me/never", create_pr=True, revision="dev")


@pytest.mark.parametrize(
    "setup,match,not_found",
    [
        (lambda api: None, "does not exist or is private", True),
        (lambda api: api.create_repo("me/r"), "no kvquant_config.json in Hub repo me/r", True),
        (lambda api: (api.create_repo("me/r"), api.upload_file(path_or_fileobj=b"{", path_in_repo=CONFIG_NAME, repo_id="me/r")), "truncated or corrupted", False),
    ],
    ids=["no-repo", "no-config", "damaged-config"],
)
def test_pull_errors(hub, setup, match, not_found):
    from huggingface_hub import HfApi

    setup(HfApi())
    with pytest.raises(KVQuantConfigError, match=match) as info:
        KVQuantConfig.from_pretrained("me/r")
    assert isinstance(info.value, ConfigNotFoundError) == not_found
    assert info.value.remedy


def test_tensor_file_missing_from_the_repo(hub, saved):
    from huggingface_hub import HfApi

    HfApi().create_repo("me/half")
    HfApi().upload_file(path_or_fileobj=str(saved / CONFIG_NAME), path_in_repo=CONFIG_NAME, repo_id="me/half")
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantConfig.from_pretrained("me/half")
    assert info.value.field == "tensors.file" and TENSORS_NAME in str(info.value)


def test_local_files_only_reads_the_cache_and_nothing_else(hub, stories_config):
    with pytest.raises(ConfigNotFoundError, match="not in the local Hub cache"):
        KVQuantConfig.from_pretrained("me/later", local_files_only=True)
    stories_config.push_to_hub("me/later")
    KVQuantConfig.from_pretrained("me/later")  # downloads into the cache
    requests = len(hub.log)
    assert KVQuantConfig.from_pretrained("me/later", local_files_only=True) == stories_config
    assert len(hub.log) == requests


# ------------------------------------------------------------------------------------------------- CLI, stand-in
def test_cli_push_pull_info(hub, saved, tmp_path, capsys):
    assert cli_main(["push", str(saved), "me/cli", "--commit-message", "from the CLI"]) == 0
    out = capsys.readouterr().out
    assert "pushed kvquant_config.json to me/cli" in out and hub.repos["me/cli"].refs["main"] in out

    target = tmp_path / "pulled"
    assert cli_main(["pull", "me/cli", "-o", str(target)]) == 0
    assert files_of(target) == files_of(saved)
    assert str(target / CONFIG_NAME) in capsys.readouterr().out

    assert cli_main(["info", "me/cli", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert (described["bits"], described["outlier_fraction"], described["fingerprint"]["num_layers"]) == (3, 0.01, 5)
    assert described["calibration"]["ppl"]["change_pct"] == 2.2222

    assert cli_main(["pull", "me/absent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvquant pull: error:") and "does not exist" in err and err.count("\n") == 1


def test_cli_push_refuses_a_damaged_folder(hub, saved, capsys):
    (saved / CONFIG_NAME).write_text((saved / CONFIG_NAME).read_text().replace('"bits": 3', '"bits": 2'))
    assert cli_main(["push", str(saved), "me/cli"]) == 2
    assert "content_sha256" in capsys.readouterr().err
    assert hub.log == []


def test_cli_push_without_credentials(hub, saved, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(saved / "no-tokens"))
    assert cli_main(["push", str(saved), "me/cli"]) == 2
    assert "pushing needs a Hub token" in capsys.readouterr().err
    assert hub.log == []
    assert cli_main(["push", str(saved), "me/cli", "--token", "hf_given_on_the_command_line"]) == 0
    assert "me/cli" in hub.repos


def test_cli_info_checks_the_model(saved, tmp_path, capsys):
    assert cli_main(["info", str(saved), "--model", str(STORIES)]) == 0
    out = capsys.readouterr().out
    assert "matches " + str(STORIES) in out
    assert "perplexity:   11.25 (fp) -> 11.5 (quantized), +2.22% on wikitext2" in out
    assert "5 layers, 8 query heads, 4 KV heads, head_dim 8, hidden 64" in out

    tiny_config(0).save_pretrained(tmp_path / "tiny")
    assert cli_main(["info", str(tmp_path / "tiny"), "--model", str(STORIES)]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT MATCH" in out and "num_layers: config has 2, model has 5" in out


# ------------------------------------------------------------------------------------------------- fresh processes
def run_fresh(steps: list[dict], env: dict, timeout: int = 300) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE"))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "hub" / "run_in_fresh_process.py"), json.dumps(steps)],
        env={**clean, **env, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,  # the assertion below shows the child's stderr
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_offline_from_a_laid_out_hub_cache(stories_config, tmp_path):
    """A model repo (weights, tokenizer, kvquant config) in a huggingface_hub cache, used with HF_HUB_OFFLINE=1."""
    repo_id = "kvq-test/stories260K"
    config = KVQuantConfig(**{**stories_config.__dict__, "fingerprint": replace(stories_config.fingerprint, model_id=repo_id)})
    config.save_pretrained(tmp_path / "config")
    files = {name: STORIES / name for name in MODEL_FILES}
    files.update({name: tmp_path / "config" / name for name in (CONFIG_NAME, TENSORS_NAME)})
    cache = tmp_path / "hub-cache"
    lay_out_hub_cache(cache, repo_id, files)

    steps = [
        {"load": repo_id, "save_to": str(tmp_path / "reloaded")},
        {"load": "kvq-test/not-downloaded", "save_to": str(tmp_path / "never")},
        {"cli": ["pull", repo_id, "-o", str(tmp_path / "pulled")]},
        {"generate": repo_id, "prompt_ids": [1, 403, 407, 261]},
    ]
    result = run_fresh(steps, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result["offline"] is True
    reloaded, missing, pulled, generated = result["steps"]

    assert "error" not in reloaded, reloaded
    assert KVQuantConfig.from_pretrained(tmp_path / "reloaded") == config
    assert missing["error"]["type"] == "ConfigNotFoundError"
    assert "not in the local Hub cache" in missing["error"]["message"] and "kvquant pull" in missing["error"]["remedy"]
    assert pulled["rc"] == 0 and files_of(tmp_path / "pulled") == files_of(tmp_path / "config")

    assert "error" not in generated, generated
    assert len(generated["tokens"]) == 10
    assert f"using {repo_id}/kvquant_config.json (nuq3-1%), found beside the model {repo_id}" in result["log"]


def test_cli_round_trip_through_hf_endpoint(saved, tmp_path):
    """`kvquant push`, `pull` and `info` in a fresh process whose HF_ENDPOINT points at the stand-in."""
    with HubStandIn() as server:
        env = {
            "HF_ENDPOINT": server.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
            "HF_TOKEN": "hf_stand_in_token",
        }
        steps = [
            {"cli": ["push", str(saved), "team/stories-kvquant", "--private"]},
            {"cli": ["pull", "team/stories-kvquant", "-o", str(tmp_path / "pulled")]},
            {"cli": ["info", "team/stories-kvquant"]},
            {"cli": ["info", "team/absent"]},
        ]
        result = run_fresh(steps, env)
        pushed, pulled, info, absent = result["steps"]
        assert pushed["rc"] == 0, pushed
        assert server.repos["team/stories-kvquant"].private
        assert server.files("team/stories-kvquant")[CONFIG_NAME] == (saved / CONFIG_NAME).read_bytes()
        assert pulled["rc"] == 0 and files_of(tmp_path / "pulled") == files_of(saved)
        assert info["rc"] == 0 and "datatype:     nuq3-1%: 3 bits" in info["stdout"]
        assert absent["rc"] == 2 and "team/absent does not exist" in absent["stderr"]
        # Every request went to the stand-in: the real Hub was never asked.
        assert ("POST", "/api/models/team/stories-kvquant/commit/main") in server.log
        assert any(path.startswith("/team/stories-kvquant/resolve/") for _, path in server.log)
