"""Released checkpoints against the local hub (tests/hub_server.py): listing refs, wrong names, fetching.

The real hub is unreachable here; the local server speaks the parts of the hub protocol that
huggingface_hub uses for model repos (refs, model search, tree, resolve). Listings run in-process
(osref passes HF_ENDPOINT explicitly); fetches run scripts/released.py in a subprocess, as the rule does.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer  # tests/ is on sys.path under pytest
from released_repo import other_repo, released_repo

from osref.paths import REPO_ROOT
from osref.released_hub import ReleasedHubError, closest_refs, list_released

REPO = "open-sci/open-sci-ref-v0.01-tiny-synthetic-40-4096"
ITERATIONS, FINAL = (10, 20, 30), 40
PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model"]
FETCHED = [
    "config.json",
    "configuration_opensci.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_opensci.py",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "HF_HUB_CACHE",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    models = {
        REPO: released_repo(ITERATIONS, FINAL),
        f"{REPO}-lr0.006-2": other_repo(),
        "open-sci/open-sci-ref-v0.01-0.13b-dclm-300B-4096": other_repo(),
        "someone-else/open-sci-ref-v0.01-tiny-synthetic-40-4096": other_repo(),
    }
    marker = tmp_path / "REMOTE_CODE_WAS_EXECUTED"
    with HubServer(models=models) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
        monkeypatch.setenv("OSREF_TEST_EXECUTED_MARKER", str(marker))
        yield server
    assert not marker.exists(), marker.read_text()


def request(repo: str = REPO, revisions: dict[str, int] | None = None, final: int = FINAL) -> dict:
    revisions = revisions if revisions is not None else {**{f"iter_{i:07d}": i for i in ITERATIONS}, "main": FINAL}
    return {
        "name": "tiny",
        "repo": repo,
        "where": "released.models[0]",
        "repo_status": "inferred",
        "alternatives": [],
        "final_iteration": final,
        "revisions": revisions,
        "patterns": PATTERNS,
    }


def test_listing_records_every_branch_at_its_commit_and_the_selected_files(hub, tmp_path):
    listing = list_released(request(), tmp_path / "listing.json")
    assert json.loads((tmp_path / "listing.json").read_text()) == listing
    repo = hub.models[REPO]
    assert listing["branches"] == repo.refs and listing["main_iteration"] == FINAL
    assert list(listing["revisions"]) == ["iter_0000010", "iter_0000020", "iter_0000030", "main"]
    for revision, entry in listing["revisions"].items():
        files = repo.commits[repo.refs[revision]]
        assert entry["commit"] == repo.refs[revision]
        assert [f["path"] for f in entry["files"]] == FETCHED  # README.md and .gitattributes are left out
        weights = next(f for f in entry["files"] if f["path"] == "model.safetensors")
        assert weights["sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
        assert entry["bytes"] == sum(len(files[p]) for p in FETCHED)


def test_a_wrong_repo_name_fails_at_listing_naming_the_closest_repos(hub, tmp_path):
    wrong = "open-sci/open-sci-ref-v0.01-tiny-synthetic-40-4069"
    with pytest.raises(ReleasedHubError) as error:
        list_released(request(repo=wrong), tmp_path / "listing.json")
    message = str(error.value)
    assert message.startswith(
        f"{wrong}: no such model repo on {hub.endpoint} (released.models[0] (repo_status: inferred))"
    )
    closest = message.split("closest existing repos: ")[1].split(". Correct")[0].split(", ")
    assert closest[0] == REPO and f"{REPO}-lr0.006-2" in closest
    assert "someone-else/" not in message  # only the same owner's repos
    assert not (tmp_path / "listing.json").exists()


def test_a_missing_branch_fails_at_listing_naming_the_closest_refs(hub, tmp_path):
    with pytest.raises(ReleasedHubError) as error:
        list_released(request(revisions={"iter_0000015": 15, "iter_0000020": 20}), tmp_path / "listing.json")
    message = str(error.value)
    assert "no branch iter_0000015 (closest existing: iter_0000010, iter_0000020, iter_0000030)" in message
    assert "The repo has 4 branches: main; iter_0000010 … iter_0000030 (3, steps [10])" in message
    assert not (tmp_path / "listing.json").exists()
    assert closest_refs("iter_7", ["main", "iter_0000010"]) == ["iter_0000010"]


def test_main_must_be_the_planned_final_iteration(hub, tmp_path):
    with pytest.raises(
        ReleasedHubError,
        match=r"main is iteration 40 \(config.json _name_or_path\), but the run is "
        r"planned with 50 iterations",
    ):
        list_released(request(revisions={"main": 50}, final=50), tmp_path / "listing.json")


def released_cli(*args: str, log: Path) -> subprocess.CompletedProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.run(
            [sys.executable, "scripts/released.py", *args],
            cwd=REPO_ROOT,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )


def test_fetch_downloads_by_commit_verifies_hashes_and_appears_only_when_complete(hub, tmp_path):
    list_released(request(), tmp_path / "listing.json")
    out = tmp_path / "fetched" / "iter_0000020"
    listed = len(hub.requests)
    hub.corrupt["model.safetensors"] = 1  # the first transfer is damaged: deleted and fetched again
    done = released_cli(
        "fetch",
        "--listing",
        str(tmp_path / "listing.json"),
        "--revision",
        "iter_0000020",
        "--out",
        str(out),
        log=tmp_path / "fetch.log",
    )
    assert done.returncode == 0, (tmp_path / "fetch.log").read_text()
    repo = hub.models[REPO]
    files = repo.commits[repo.refs["iter_0000020"]]
    for name in FETCHED:
        assert (out / name).read_bytes() == files[name], name
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["revision"], manifest["commit"], manifest["iteration"]) == (
        "iter_0000020",
        repo.refs["iter_0000020"],
        20,
    )
    assert sorted(r["path"] for r in manifest["files"]) == FETCHED
    assert len(hub.transfers("model.safetensors")) == 2
    # downloads asked for the listed commit, never the branch name (a moved branch cannot mix states)
    resolves = [r.path for r in hub.requests[listed:] if "/resolve/" in r.path]
    assert resolves and all(f"/resolve/{repo.refs['iter_0000020']}/" in p for p in resolves)
    assert not (tmp_path / "fetched" / "iter_0000020.partial").exists()


def test_a_fetch_that_keeps_failing_leaves_no_directory(hub, tmp_path):
    list_released(request(), tmp_path / "listing.json")
    out = tmp_path / "fetched" / "main"
    hub.corrupt["model.safetensors"] = 10
    done = released_cli(
        "fetch",
        "--listing",
        str(tmp_path / "listing.json"),
        "--revision",
        "main",
        "--out",
        str(out),
        log=tmp_path / "fetch.log",
    )
    assert done.returncode == 1
    assert "model.safetensors: sha256" in (tmp_path / "fetch.log").read_text()
    assert not out.exists()  # only the .partial directory, which a retry reuses


def test_cli_exit_status_2_names_the_wrong_repo(hub, tmp_path):
    done = released_cli(
        "list",
        "--request-json",
        json.dumps(request(repo=f"{REPO}-typo")),
        "--out",
        str(tmp_path / "listing.json"),
        log=tmp_path / "list.log",
    )
    assert done.returncode == 2
    assert f"released.py list: {REPO}-typo: no such model repo" in (tmp_path / "list.log").read_text()
