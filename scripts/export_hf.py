"""Export one megatron torch_dist checkpoint of a run to a Hugging Face directory, behind a parity gate.

The exported model is loaded back and must reproduce the megatron model's logits (fp32, max |Δlogit|
<= tolerance) before the directory appears; otherwise the script exits with status 2 and leaves
nothing behind. See osref/export.py for the class chosen per flavour (HYV3ForCausalLM for the
open-sci-ref 0.01 flavour, needs transformers >= 5).

Examples:

    # one checkpoint of a pipeline run (run.json is written by the workflow), bf16 weights
    python scripts/export_hf.py --run-json results/runs/0.13b-c4-300B-4096/run.json --iteration 72000 \\
        --out results/runs/0.13b-c4-300B-4096/hf/iter_0072000

    # tiny CPU example (seconds): train the tiny demo run to iteration 20, then export it in fp32
    python scripts/train.py --run-json results/runs/tiny-demo-0.25M-128/run.json --until 20
    python scripts/export_hf.py --run-json results/runs/tiny-demo-0.25M-128/run.json --iteration 20 \\
        --out results/runs/tiny-demo-0.25M-128/hf/iter_0000020 --dtype float32

    # the result loads without trust_remote_code (transformers >= 5 for the 0.01 flavour, HYV3):
    python -c "from transformers import AutoModelForCausalLM as M; \\
        M.from_pretrained('results/runs/tiny-demo-0.25M-128/hf/iter_0000020')"

Exit status: 0 exported; 2 parity gate failed (logits, or a config.json field that differs from the
model spec; nothing written); 3 another export of the same target is running (the message names it;
its files are left alone); 1 any other error (a --tolerance that is not finite and positive too).
Temporaries of the same target left by killed exports (.iter_XXXXXXX.tmp-PID) are removed first.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from osref.contracts import ContractError, load_run_document
from osref.export import DEFAULT_PARITY_TOKENS, DEFAULT_TOLERANCE, ParityError, export_checkpoint
from osref.locks import LockHeld


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-json", required=True, type=Path, help="resolved run JSON (model/train/tokenizer/paths)")
    parser.add_argument("--iteration", required=True, type=int, help="checkpoint iteration (iter_%%07d)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created atomically)")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of model.safetensors (parity is always computed in fp32)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="max allowed |Δlogit| between megatron and the export (default %(default)g)",
    )
    parser.add_argument(
        "--parity-tokens",
        type=int,
        default=DEFAULT_PARITY_TOKENS,
        help="tokens per parity sequence (clipped to seq_length)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        print(
            f"--tolerance {args.tolerance!r} (config parity_tolerance): must be a finite positive number",
            file=sys.stderr,
        )
        return 1
    try:
        run = load_run_document(args.run_json)
    except ContractError as error:
        print(error, file=sys.stderr)
        return 1
    try:
        provenance = export_checkpoint(
            run, args.iteration, args.out, dtype=args.dtype, tolerance=args.tolerance, parity_tokens=args.parity_tokens
        )
    except ParityError as error:
        print(f"PARITY FAILURE, nothing written to {args.out}: {error}", file=sys.stderr)
        return 2
    except LockHeld as error:
        print(f"another export of {args.out} is running, nothing done: {error}", file=sys.stderr)
        return 3
    print(
        f"exported {run.run_id} iter {args.iteration} to {args.out} "
        f"({provenance['hf_class']}, {args.dtype}, max |Δlogit| {provenance['parity']['max_abs_logit_diff']:.3g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
