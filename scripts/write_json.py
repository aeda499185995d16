"""Write a JSON document handed over by Snakemake (the `script:` directive) atomically.

Used by the rules that materialise config-derived documents, e.g. a run's resolved
`run.json` (model, recipe, data prefixes) that training, export and evaluation read:

    rule run_config: params: document=...  script: "../../scripts/write_json.py"

From a shell it is `python scripts/write_json.py OUT.json '{"key": 1}'`.
"""

import json
import sys

from osref.files import write_json_atomic

if __name__ == "__main__":
    if "snakemake" in globals():
        smk = snakemake  # noqa: F821 (injected by Snakemake's script: directive)
        write_json_atomic(smk.output[0], smk.params.document)
    else:
        write_json_atomic(sys.argv[1], json.loads(sys.argv[2]))
