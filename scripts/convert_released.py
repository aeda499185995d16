"""Convert a released open-sci-ref 0.01 checkpoint (open-sci/open-sci-ref-v0.01-*) to our export format.

The published models need remote code that breaks on transformers 5.x; the converted directory is a
plain HYV3ForCausalLM (no trust_remote_code), laid out like our own exports, so the evaluation and
report stages treat reference models and reproductions alike. See osref/released.py for the tensor
mapping and the QK-norm check (read from the release's own remote code, which is never run).

Usage:

    # fetch a release (login node, network) -- main is the final checkpoint, branches iter_XXXXXXX the others
    hf download open-sci/open-sci-ref-v0.01-0.13b-dclm-300B-4096 --revision iter_0070000 \\
        --local-dir local/released/0.13b-dclm-300B-4096/iter_0070000

    python scripts/convert_released.py --src local/released/0.13b-dclm-300B-4096/iter_0070000 \\
        --out results/runs/released/0.13b-dclm-300B-4096/hf/iter_0070000 \\
        --repo open-sci/open-sci-ref-v0.01-0.13b-dclm-300B-4096 --revision iter_0070000 --iteration 70000

Options: --kv-heads N asserts the KV-head count (it is read from the k_proj tensors anyway, since the
release's megatron metadata says num_query_groups=1 for plain multi-head attention); --dtype keeps the
stored dtype (bfloat16) unless given; --iteration N asserts the training iteration (the workflow passes
the one it planned); --tolerance is the reference-forward gate (max |Δlogit|, fp32). The QK norm is read
from the checkpoint's modeling_opensci.py (parsed, never run); a directory without remote code needs
--assume-qk-norm rmsnorm.

In the workflow (workflow/rules/released.smk) the rule convert_released runs this on each fetched
revision; `snakemake --configfile config/released.yaml released` drives the whole chain.

Exit status: 0 converted; 2 the source is not a released checkpoint we understand, or the converted
model fails the reference-forward gate (nothing written); 1 any other error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from osref.export import ParityError
from osref.released import DEFAULT_TOKENIZER_DIR, DEFAULT_TOLERANCE, ReleasedFormatError, convert_released


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", type=Path, required=True, help="downloaded release directory (config.json + safetensors)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced if it exists)")
    parser.add_argument("--repo", default=None, help="source hub repo id, recorded in provenance.json")
    parser.add_argument(
        "--revision", default=None, help="source revision (main or iter_XXXXXXX), recorded in provenance.json"
    )
    parser.add_argument("--kv-heads", type=int, default=None, help="expected KV heads; must match the tensors")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="weight dtype of the output (default: as stored)",
    )
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    parser.add_argument("--iteration", type=int, default=None, help="expected training iteration of the revision")
    parser.add_argument(
        "--commit", default=None, help="resolved commit sha of the revision, recorded in provenance.json"
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="reference-forward gate: max |logit difference| in fp32 (default %(default)g)",
    )
    parser.add_argument(
        "--assume-qk-norm",
        choices=("rmsnorm",),
        default=None,
        help="only for a directory without the release's remote code: assume per-head RMSNorm",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        provenance = convert_released(
            args.src,
            args.out,
            source_repo=args.repo,
            revision=args.revision,
            kv_heads=args.kv_heads,
            dtype=args.dtype,
            tokenizer_dir=args.tokenizer_dir,
            expected_iteration=args.iteration,
            tolerance=args.tolerance,
            assume_qk_norm=args.assume_qk_norm,
            source_commit=args.commit,
        )
    except (ReleasedFormatError, ParityError) as error:
        print(f"convert_released: {error}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {k: provenance[k] for k in ("source_repo", "revision", "iteration", "hf_class", "dtype", "kv_heads")}
            | {"max_abs_logit_diff": provenance["reference_forward"]["max_abs_logit_diff"]}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
