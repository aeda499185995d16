# Tokenize: one shard group -> one Megatron .bin/.idx pair (+ stats); per dataset, a manifest of
# the groups' totals.

# tokenizer.bad_documents / max_bad_fraction: outside `params` on purpose (not a rerun trigger)
BAD_DOCUMENTS_ARGS = INDEX.bad_documents_args


rule tokenize_group:
    input:
        manifest=LAYOUT.download_manifest("{dataset}", "{group}"),
    output:
        bin=LAYOUT.tokenized_files("{dataset}", "{group}")["bin"],
        idx=LAYOUT.tokenized_files("{dataset}", "{group}")["idx"],
        stats=LAYOUT.tokenized_files("{dataset}", "{group}")["stats"],
    log:
        LAYOUT.log("tokenize", "{dataset}", "group_{group}"),
    benchmark:
        LAYOUT.benchmark("tokenize", "{dataset}", "group_{group}")
    threads: 2
    resources:
        runtime=12 * 60,
        mem_mb=8000,
    params:
        prefix=lambda wc: LAYOUT.tokenized_prefix(wc.dataset, wc.group),
        fmt=lambda wc: INDEX.dataset_block(wc.dataset)["format"],
        text_field=lambda wc: INDEX.dataset_block(wc.dataset)["text_field"],
        max_docs=lambda wc: (
            [f"--max-documents={INDEX.dataset_block(wc.dataset)['max_documents']}"]
            if INDEX.dataset_block(wc.dataset)["max_documents"]
            else []
        ),
        tokenizer=repo_relative(config["tokenizer"]["path"]),
        sha256=config["tokenizer"]["sha256"],
        eod=config["tokenizer"]["eod_id"],
        backend=config["tokenizer"]["backend"],
        verify_documents=config["tokenizer"]["verify_documents"],
    shell:
        # one single-threaded worker process per core; the output does not depend on their number
        "RAYON_NUM_THREADS=1 {PYTHON} {SCRIPTS:q}/tokenize_group.py --manifest={input.manifest:q} "
        "--format={params.fmt:q} --text-field={params.text_field:q} --tokenizer={params.tokenizer:q} "
        "--tokenizer-sha256={params.sha256:q} --eod-id={params.eod:q} {params.max_docs:q} "
        "--workers={threads} --backend={params.backend:q} --verify-documents={params.verify_documents:q} {BAD_DOCUMENTS_ARGS} "
        "--out-prefix={params.prefix:q} --stats={output.stats:q} > {log:q} 2>&1"


rule tokenized_dataset_manifest:
    input:
        stats=lambda wc: INDEX.tokenized_stats(wc.dataset),
    output:
        LAYOUT.tokenized_manifest("{dataset}"),
    log:
        LAYOUT.log("tokenize", "{dataset}", "manifest"),
    localrule: True
    shell:
        "{PYTHON} {SCRIPTS:q}/dataset_manifest.py --out={output:q} {input.stats:q} > {log:q} 2>&1"


rule tokenize:
    input:
        INDEX.tokenized,
