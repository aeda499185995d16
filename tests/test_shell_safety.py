"""Config strings never run as shell code: every value that reaches a rule's command is quoted.

One config puts shell metacharacters (spaces, quotes, ``;``, ``$(...)``, backticks, pipes,
redirections) into every free-text field that reaches a job: the three path roots, the tokenizer
path, a local dataset's file path and text field, the evaluation device, the container, the NCCL
variables, the recipe, protocol and experiment names, label/notes/licence. Each command substitution
in it would create a file named ``pwned-*`` in the job's working directory.

* Real jobs through real ``snakemake`` (the cheap ones: listing, download, tokenize, manifest,
  run.json, plan): they succeed (the text field with its metacharacters is found in the corpus, so
  it arrived as one argument), their outputs and logs land under the odd paths, and no ``pwned-*``
  file appears anywhere.
* The commands of the other jobs (train, export, evaluate, local tasks; and train with a container
  and NCCL variables on a CUDA config): the dry-run's printed commands, split as bash splits them
  (``shlex``), carry every odd value as one whole word.
* Slow: the rest of the chain runs for real under the odd paths (train, export, local tasks,
  evaluate, report), then one evaluation with the odd device fails with that device named whole.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import _read_documents, snakemake_cmd

ROOT = Path(__file__).resolve().parent.parent
CANARIES = ("pwned-semi", "pwned-dollar", "pwned-tick", "pwned-pipe")
# no glob characters (a local dataset's path is a glob pattern) and no braces (Snakemake wildcards)
# and balanced quotes, so that unquoted it is valid shell and would run
ODD = "x$(touch pwned-dollar)`touch pwned-tick` a b;touch pwned-semi;c'd'e\"f\"|touch pwned-pipe&x#y<>z!"
DATASET = "odd.set-1"
RUN_ID = f"tiny-{DATASET}-2048-128"  # 2 iterations of 8 x 128 tokens
DOCUMENTS = 120


def odd_config(tmp_path: Path) -> dict:
    """The demo, tiny, with ``ODD`` in every free-text field; the corpus and tokenizer are copied
    under odd directory names."""
    corpus_dir = tmp_path / f"corpus {ODD}"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    text_field = f"text {ODD}"
    corpus = corpus_dir / "docs.jsonl"
    corpus.write_text("".join(json.dumps({text_field: t}) + "\n" for t in _read_documents(DOCUMENTS)))
    tokenizer = tmp_path / f"tokenizer {ODD}"
    if not tokenizer.exists():
        shutil.copytree(ROOT / "assets" / "gpt-neox-20b", tokenizer)

    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["paths"] = {key: str(tmp_path / f"{key} {ODD}") for key in ("data", "runs", "results")}
    config["tokenizer"] = {"path": str(tokenizer)}
    block = config["datasets"].pop("pydocs")
    config["datasets"]["eval-corpus"] = dict(block)  # the local lm-eval tasks read a "text" field
    block.update(
        paths=[str(corpus)],
        format="jsonl",
        text_field=text_field,
        label=ODD,
        notes=ODD,
        license=ODD,
        approx_bytes=corpus.stat().st_size,
        max_documents=DOCUMENTS,
    )
    config["datasets"][DATASET] = block
    config["recipes"] = {ODD: {**config["recipes"]["demo"], "warmup_iters": 1, "save_interval": 2}}
    config["scales"]["tiny"]["num_layers"] = 2
    config["scales"]["tiny"]["resources"]["segment_iters"] = 2
    config["experiments"] = [{"name": ODD, "datasets": [DATASET], "scales": ["tiny"], "budgets": [2048], "recipe": ODD}]
    evaluation = config["evaluation"]
    evaluation.update(local_tasks="eval-corpus", protocol=ODD, limit=8)
    evaluation["protocols"] = {ODD: evaluation["protocols"]["demo"]}
    return config


def write_config(tmp_path: Path, config: dict, name: str = "odd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def snakemake(work: Path, config: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd(work, config, *args)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def assert_no_canary(*roots: Path) -> None:
    found = [p for root in roots for p in root.rglob("pwned-*") if p.name in CANARIES]
    assert not found, f"a config string ran as shell code: {found}"


def shell_commands(output: str) -> dict[str, list[list[str]]]:
    """rule -> the words of each printed command, split as bash would split them."""
    commands: dict[str, list[list[str]]] = {}
    rule = None
    for line in output.splitlines():
        if line.startswith(("rule ", "localrule ")):
            rule = line.split()[1].rstrip(":")
        elif line.startswith("Shell command: ") and rule:
            commands.setdefault(rule, []).append(shlex.split(line[len("Shell command: ") :]))
    return commands


def test_odd_strings_in_every_free_text_field_run_nothing(tmp_path):
    config = odd_config(tmp_path)
    path = write_config(tmp_path, config)
    work = tmp_path / "work"
    data, runs, results = (Path(config["paths"][k]) for k in ("data", "runs", "results"))
    run_json = f"{runs}/{RUN_ID}/run.json"

    proc = snakemake(work, path, "tokenize", run_json, "plan")
    assert_no_canary(tmp_path, work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    stats = json.loads((data / "tokenized" / DATASET / "group_000.stats.json").read_text())
    assert stats["documents"] == DOCUMENTS  # the odd text field was found: it arrived as one argument
    assert (data / "tokenized" / DATASET / "group_000.idx").is_file()
    assert json.loads(Path(run_json).read_text())["tokenizer"]["path"] == config["tokenizer"]["path"]
    assert (results / "plan.csv").read_text().count(RUN_ID) == 1
    assert (results / "logs" / "tokenize" / DATASET / "group_000.log").is_file()

    # every other job's command, as bash would split it: each odd value is one whole word
    dry = snakemake(work, path, "-n", "-p")
    assert dry.returncode == 0, dry.stderr[-3000:]
    commands = shell_commands(dry.stdout + dry.stderr)
    assert {"train_segment", "export_hf", "build_eval_tasks", "evaluate_shots"} <= set(commands), sorted(commands)
    hf_dir = f"{runs}/{RUN_ID}/hf/iter_0000002"
    (train,) = commands["train_segment"]
    assert f"--run-json={run_json}" in train and f"--marker={runs}/{RUN_ID}/train/segment_0000002.json" in train
    (export,) = commands["export_hf"]
    assert f"--out={hf_dir}" in export and f"--run-json={run_json}" in export
    for evaluate in commands["evaluate_shots"]:
        assert f"--hf-dir={hf_dir}" in evaluate and f"--include-path={data}/eval_tasks" in evaluate
        assert f"--hf-home={results}/hf_home" in evaluate and "--device=cpu" in evaluate
        protocol = json.loads(next(w for w in evaluate if w.startswith("--tasks-json="))[len("--tasks-json=") :])
        assert [t["task"] for t in protocol] == [t["task"] for t in config["evaluation"]["protocols"][ODD]]
    (tasks,) = commands["build_eval_tasks"]
    assert f"--out={data}/eval_tasks" in tasks
    for words in (train, export, tasks, *commands["evaluate_shots"]):
        assert words[-1] == "2>&1"  # the redirections are the only shell syntax left
        assert not {";", "|", "&"} & set(words), words

    # the fields that reach a command only on GPUs or with a container
    cuda = dict(
        config,
        cluster={
            **config.get("cluster", {}),
            "device": "cuda",
            "container": f"image {ODD}.sif",
            "nccl_env": {"NCCL_SOCKET_IFNAME": ODD},
        },
    )
    cuda["evaluation"] = {**config["evaluation"], "device": f"cuda {ODD}"}
    dry = snakemake(work, write_config(tmp_path, cuda, "odd_cuda.yaml"), "-n", "-p", "--forceall")
    assert dry.returncode == 0, dry.stderr[-3000:]
    commands = shell_commands(dry.stdout + dry.stderr)
    (train,) = commands["train_segment"]
    assert f"NCCL_SOCKET_IFNAME={ODD}" in train and f"image {ODD}.sif" in train
    assert train[train.index(f"image {ODD}.sif") - 2 :][:2] == ["exec", "--nv"]
    (tokenize,) = commands["tokenize_group"]
    assert f"--text-field=text {ODD}" in tokenize and f"--tokenizer={config['tokenizer']['path']}" in tokenize
    (listing,) = [words for words in commands["list_dataset"] if f"--name={DATASET}" in words]
    listing = json.loads(next(w for w in listing if w.startswith("--dataset-json="))[len("--dataset-json=") :])
    assert listing["paths"] == config["datasets"][DATASET]["paths"]
    assert all(f"--device=cuda {ODD}" in words for words in commands["evaluate_shots"])
    assert_no_canary(tmp_path, work)


@pytest.mark.slow
def test_odd_paths_carry_the_whole_chain_and_an_odd_device_is_refused_whole(tmp_path):
    """The rest of the chain for real under the odd paths and names: train, export, local tasks,
    evaluate, report. Then one evaluation again with an odd evaluation.device: the job fails, its
    log names the device whole, and nothing ran."""
    config = odd_config(tmp_path)
    work = tmp_path / "work"
    proc = snakemake(work, write_config(tmp_path, config), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    runs, results = Path(config["paths"]["runs"]), Path(config["paths"]["results"])
    provenance = json.loads((runs / RUN_ID / "hf" / "iter_0000002" / "provenance.json").read_text())
    assert provenance["parity"]["max_abs_logit_diff"] <= provenance["parity"]["tolerance"]
    assert len(list((runs / RUN_ID / "eval" / "iter_0000002").glob("*shot.json"))) == 2
    assert (results / "report" / "index.html").stat().st_size > 10_000
    assert_no_canary(tmp_path, work)

    device = f"cpu {ODD}"
    odd_device = dict(config, evaluation={**config["evaluation"], "device": device})
    target = f"{runs}/{RUN_ID}/eval/iter_0000002/0shot.json"
    proc = snakemake(
        work, write_config(tmp_path, odd_device, "odd_device.yaml"), target, "--forcerun", "evaluate_shots"
    )
    assert proc.returncode != 0
    log = (results / "logs" / "evaluate" / RUN_ID / "iter_0000002" / "0shot.log").read_text()
    assert f"--device {device!r} (config evaluation.device): not a torch device" in log, log[-2000:]
    assert_no_canary(tmp_path, work)
