# Download: one listing job per dataset, then one job per static shard group.


rule list_dataset:
    output:
        LAYOUT.listing("{dataset}"),
    log:
        LAYOUT.log("download", "{dataset}", "listing"),
    localrule: True
    params:
        dataset=lambda wc: json.dumps(INDEX.listing_params(wc.dataset)),
    shell:
        "{PYTHON} {SCRIPTS:q}/download.py list --name={wildcards.dataset:q} --dataset-json={params.dataset:q} "
        "--out={output:q} > {log:q} 2>&1"


rule download_group:
    input:
        listing=LAYOUT.listing("{dataset}"),
    output:
        manifest=LAYOUT.download_manifest("{dataset}", "{group}"),
    log:
        LAYOUT.log("download", "{dataset}", "group_{group}"),
    resources:
        runtime=24 * 60,
    params:
        out_dir=lambda wc: LAYOUT.download_dir(wc.dataset, wc.group),
    shell:
        "{PYTHON} {SCRIPTS:q}/download.py fetch --name={wildcards.dataset:q} --listing={input.listing:q} "
        "--group={wildcards.group:q} --out-dir={params.out_dir:q} --manifest={output.manifest:q} > {log:q} 2>&1"


rule download:
    input:
        INDEX.download_manifests,
