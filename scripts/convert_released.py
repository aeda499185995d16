"""Convert a released open-sci-ref 0.01 checkpoint (open-sci/open-sci-ref-v0.01-*) to our export format.

The published models need remote code that breaks on transformers 5.x; the converted directory is a
plain HYV3ForCausalLM (no trust_remote_code), laid out like our own exports, so the evaluation and
report stages treat reference models and reproductions alike. See osref/released.py for the tensor
mapping and the one assumption it makes (QK norms are RMSNorm weights).

Usage:

    # fetch a release (login node, network) -- main is the final checkpoint, branches iter_XXXXXXX the others
    huggingface-cli download open-sci/open-sci-ref-v0.01-1.7b-nemotron-hq-1T-16384 --revision iter_0072661 \\
        --local-dir local/released/1.7b-nemotron-hq-1T-16384/iter_0072661

    python scripts/convert_released.py --src local/released/1.7b-nemotron-hq-1T-16384/iter_0072661 \\
        --out results/released/1.7b-nemotron-hq-1T-16384/hf/iter_0072661 \\
        --repo open-sci/open-sci-ref-v0.01-1.7b-nemotron-hq-1T-16384 --revision iter_0072661

Options: --kv-heads N asserts the KV-head count (it is read from the k_proj tensors anyway, since the
release's megatron metadata says num_query_groups=1 for plain multi-head attention); --dtype keeps the
stored dtype (bfloat16) unless given.

Exit status: 0 converted; 2 the source is not a released checkpoint we understand (nothing written);
1 any other error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osref.export import ParityError
from osref.released import DEFAULT_TOKENIZER_DIR, ReleasedFormatError, convert_released


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="downloaded release directory (config.json + safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced if it exists)")
    parser.add_argument("--repo", default=None, help="source hub repo id, recorded in provenance.json")
    parser.add_argument("--revision", default=None, help="source revision (main or iter_XXXXXXX), recorded in provenance.json")
    parser.add_argument("--kv-heads", type=int, default=None, help="expected KV heads; must match the tensors")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="weight dtype of the output (default: as stored)")
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_TOKENIZER_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        provenance = convert_released(args.src, args.out, source_repo=args.repo, revision=args.revision,
                                      kv_heads=args.kv_heads, dtype=args.dtype, tokenizer_dir=args.tokenizer_dir)
    except (ReleasedFormatError, ParityError) as error:
        print(f"convert_released: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: provenance[k] for k in ("source_repo", "revision", "iteration", "hf_class", "dtype", "kv_heads")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
