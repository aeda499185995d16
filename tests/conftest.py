"""Fixtures shared by the training tests: a tiny Megatron dataset built from the demo corpus and
run JSONs derived from tests/data/tiny_run.json.

The dataset is session-scoped so test_training.py and test_training_faults.py tokenize it once.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "assets/demo-corpus/pydocs311_rst_corpus.jsonl.zst"
TOKENIZER = REPO / "assets/gpt-neox-20b/tokenizer.json"
TINY_RUN = REPO / "tests/data/tiny_run.json"
DOCUMENTS = 200


def _read_documents(limit: int) -> list[str]:
    import zstandard

    texts = []
    with CORPUS.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as reader:
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            texts.append(json.loads(line)["text"])
            if len(texts) == limit:
                break
    return texts


def write_tiny_corpus(prefix: Path) -> None:
    """The first ``DOCUMENTS`` demo documents as a uint16 Megatron dataset, EOD 0 after each."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for text in _read_documents(DOCUMENTS):
        builder.add_item(torch.tensor(tokenizer.encode(text).ids + [0], dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    (root / "demo").mkdir()
    write_tiny_corpus(root / "demo" / "group_000")
    return root


def make_run(data_root: Path, run_dir: Path) -> dict:
    run = json.loads(TINY_RUN.read_text())
    run["data"]["prefixes"] = [str(data_root / "demo" / "group_000")]
    run["data"]["cache_dir"] = str(data_root / "index_cache")
    run["tokenizer"]["path"] = str(REPO / run["tokenizer"]["path"])
    run["paths"]["run_dir"] = str(run_dir)
    return run


def snakemake_cmd(work: Path, config: Path, *args: str, cores: str = "2") -> list[str]:
    """A real Snakemake run of this checkout's workflow in ``work`` with the local profile."""
    return [
        sys.executable, "-m", "snakemake", *args, "-s", str(REPO / "Snakefile"), "-d", str(work),
        "--profile", str(REPO / "profiles" / "local"), "--cores", cores, "--configfile", str(config),
    ]  # fmt: skip


def checkpoint_tensors(run_dir: Path, iteration: int) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model and optimizer state), consolidated."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = run_dir / f"consolidated_{iteration}.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / f"iter_{iteration:07d}"), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
