"""Released checkpoints on the hub: list a repo's refs once, then fetch one revision per job.

Listing (``list_released``, one local job per repo): ``HfApi.list_repo_refs`` gives every branch
with the commit it points to *now*; the listing records those commits, and each fetch downloads by
commit, so a branch that moves later cannot mix two states of one run. It then checks what the plan
assumed without network: every selected revision (``main`` for the final iteration, ``iter_XXXXXXX``
for the others) is a branch of the repo, and ``main`` is the final iteration (from ``config.json``'s
``_name_or_path``, ``…/hf/iter_0072661``). A wrong repo name fails here, naming the closest repos of
the same owner; a missing branch fails naming the closest existing refs. Last, the tree of every
selected revision (sizes, LFS sha256, git blob ids) goes into ``listing.json``: the plan's download
size and the fetch's integrity checks come from it.

Fetching (``fetch_revision``, one job per revision): the files of the revision's tree that a
conversion needs (weights, configs, tokenizer files, the remote-code ``.py`` files, which are
stored, never run) are downloaded with :func:`osref.download.fetch_group`, the same code and the same
hash checks as the datasets', into ``<out>.partial/`` and renamed to ``<out>`` only when complete.
``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured; the token is never written.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from osref.download import fetch_group, hub_endpoint
from osref.files import commit_partial, partial_path, write_json_atomic

log = logging.getLogger(__name__)
_ITER_BRANCH = re.compile(r"^iter_(\d+)$")


class ReleasedHubError(RuntimeError):
    """The hub does not hold what the config or mapping says (repo, branch, final iteration, files)."""


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint())


def closest_repos(api, repo: str, n: int = 5) -> list[str]:
    """Model repos of the same owner whose names are closest to ``repo`` (empty if they cannot be listed)."""
    owner = repo.split("/")[0]
    try:
        names = [model.id for model in api.list_models(author=owner, limit=5000)]
    except Exception as error:  # noqa: BLE001 (only a hint: the error that matters is the missing repo)
        log.warning("could not list the repos of %s: %s", owner, error)
        return []
    return difflib.get_close_matches(repo, names, n=n, cutoff=0.6)


def closest_refs(missing: str, refs: list[str], n: int = 3) -> list[str]:
    """For ``iter_N``: the iter branches nearest in iteration; otherwise the closest names."""
    match = _ITER_BRANCH.match(missing)
    iters = {int(m.group(1)): ref for ref in refs if (m := _ITER_BRANCH.match(ref))}
    if match and iters:
        wanted = int(match.group(1))
        return [iters[i] for i in sorted(iters, key=lambda i: (abs(i - wanted), i))[:n]]
    return difflib.get_close_matches(missing, refs, n=n, cutoff=0.3)


def _describe_refs(branches: dict[str, str]) -> str:
    iters = sorted(int(m.group(1)) for b in branches if (m := _ITER_BRANCH.match(b)))
    others = sorted(b for b in branches if not _ITER_BRANCH.match(b))
    text = f"{len(branches)} branches: {', '.join(others) or 'no other'}"
    if iters:
        steps = sorted({b - a for a, b in zip(iters, iters[1:], strict=False)})
        text += f"; iter_{iters[0]:07d} … iter_{iters[-1]:07d} ({len(iters)}, steps {steps[:3]})"
    return text


def _read_config(api, repo: str, commit: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = api.hf_hub_download(repo, "config.json", revision=commit, local_dir=tmp)
        return json.loads(Path(path).read_text())


def _revision_files(api, repo: str, commit: str, patterns: list[str]) -> list[dict[str, Any]]:
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    tree = api.list_repo_tree(repo, revision=commit, recursive=True)
    selected = filter_repo_objects(
        (e for e in tree if isinstance(e, RepoFile)), allow_patterns=patterns, key=lambda e: e.path
    )
    files: list[dict[str, Any]] = [
        {
            "path": e.path,
            "size": e.size,
            "sha256": e.lfs.sha256 if e.lfs else None,
            **({} if e.lfs else {"git_sha1": e.blob_id}),
        }
        for e in selected
    ]
    names = {f["path"] for f in files}
    if "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise ReleasedHubError(
            f"{repo}@{commit[:12]}: no config.json and *.safetensors among {sorted(names)[:12]} "
            "(pytorch_model.bin checkpoints are not supported)"
        )
    return sorted(files, key=lambda f: f["path"])


def list_released(request: dict[str, Any], out_path: str | Path) -> dict[str, Any]:
    """List the refs of ``request["repo"]``, verify the selected revisions, write ``listing.json``.

    ``request``: name, repo, where (config key / mapping line, for messages), repo_status,
    alternatives, final_iteration, revisions ({revision: iteration}), patterns (files to fetch).
    """
    from huggingface_hub.errors import RepositoryNotFoundError

    api = _api()
    repo, where = request["repo"], request["where"]
    try:
        refs = api.list_repo_refs(repo)
    except RepositoryNotFoundError:
        close = closest_repos(api, repo)
        seen = f" (repo_status: {request['repo_status']})" if request.get("repo_status") else ""
        alternatives = [a for a in request.get("alternatives", []) if a not in close]
        hint = "; closest existing repos: " + ", ".join(close) if close else "; no similar repo of that owner was found"
        if alternatives:
            hint += "; other names seen for this run: " + ", ".join(alternatives)
        raise ReleasedHubError(
            f"{repo}: no such model repo on {api.endpoint} ({where}{seen}){hint}. Correct the repo "
            "(the mapping's repo column, or released.models[].repo) and list again"
        ) from None
    branches = {b.name: b.target_commit for b in refs.branches}
    tags = {t.name: t.target_commit for t in refs.tags}
    wanted: dict[str, int] = request["revisions"]
    missing = [rev for rev in sorted(wanted, key=lambda rev: wanted[rev]) if rev not in branches]
    if missing:
        shown = "; ".join(
            f"{rev} (closest existing: {', '.join(closest_refs(rev, list(branches))) or 'none'})" for rev in missing[:5]
        )
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ReleasedHubError(
            f"{repo} ({where}): no branch {shown}{more}. The repo has {_describe_refs(branches)}; "
            "select existing iterations (released.iterations / models[].iterations) or correct "
            "save_interval / train_iters"
        )
    main_iteration = None
    if "main" in branches:
        from osref.released import iteration_of  # torch: only needed here

        main_iteration = iteration_of(None, _read_config(api, repo, branches["main"]))
        final = request["final_iteration"]
        if main_iteration is not None and main_iteration != final:
            raise ReleasedHubError(
                f"{repo} ({where}): main is iteration {main_iteration} (config.json _name_or_path), "
                f"but the run is planned with {final} iterations: is this the right repo, or are "
                "train_iters / global_batch_size wrong?"
            )
        if main_iteration is None:
            log.warning(
                "%s: config.json of main names no iter_XXXXXXX in _name_or_path; main taken as iteration %d",
                repo,
                final,
            )
    revisions = {}
    for rev, iteration in sorted(wanted.items(), key=lambda item: item[1]):
        files = _revision_files(api, repo, branches[rev], request["patterns"])
        revisions[rev] = {
            "iteration": iteration,
            "commit": branches[rev],
            "files": files,
            "bytes": sum(f["size"] or 0 for f in files),
        }
        log.info(
            "%s %s (iteration %d) at %s: %d files, %.3g GB",
            repo,
            rev,
            iteration,
            branches[rev][:12],
            len(files),
            revisions[rev]["bytes"] / 1e9,
        )
    listing = {
        "name": request["name"],
        "repo": repo,
        "endpoint": api.endpoint,
        "where": where,
        "branches": branches,
        "tags": tags,
        "main_iteration": main_iteration,
        "revisions": revisions,
    }
    write_json_atomic(out_path, listing, indent=1, sort_keys=True)
    return listing


def fetch_revision(listing_path: str | Path, revision: str, out_dir: str | Path) -> dict[str, Any]:
    """Download one listed revision into ``out_dir`` (via ``<out_dir>.partial``); returns its manifest."""
    listing = json.loads(Path(listing_path).read_text())
    entry = listing["revisions"].get(revision)
    if entry is None:
        raise ReleasedHubError(
            f"{listing_path}: revision {revision!r} was not listed (listed: "
            f"{', '.join(listing['revisions'])}); list again: snakemake --forcerun list_released"
        )
    out_dir = Path(out_dir)
    partial = partial_path(out_dir)  # a fixed name: a retried job reuses what it holds
    partial.mkdir(parents=True, exist_ok=True)
    files = entry["files"]
    group_listing = {
        "source": "hub",
        "repo_id": listing["repo"],
        "repo_type": "model",
        "revision": entry["commit"],
        "files": files,
        "groups": [list(range(len(files)))],
    }
    write_json_atomic(partial / ".osref-listing.json", group_listing)
    name = f"{listing['repo']}@{revision}"
    manifest = fetch_group(name, partial / ".osref-listing.json", 0, partial, partial / "manifest.json")
    (partial / ".osref-listing.json").unlink()
    manifest = {
        "repo": listing["repo"],
        "revision": revision,
        "commit": entry["commit"],
        "iteration": entry["iteration"],
        "files": [{**record, "path": os.path.relpath(record["path"], partial)} for record in manifest["files"]],
    }
    write_json_atomic(partial / "manifest.json", manifest, indent=1)
    commit_partial(partial, out_dir)  # replaces out_dir only when run by hand (Snakemake removes it first)
    return manifest
