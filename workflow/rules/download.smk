# Download: one listing job per dataset, then one job per static shard group.


rule list_dataset:
    output:
        LAYOUT.listing("{dataset}"),
    log:
        LAYOUT.log("download", "{dataset}", "listing"),
    params:
        dataset=lambda wc: json.dumps(INDEX.listing_params(wc.dataset)),
    localrule: True
    shell:
        "{PYTHON} {SCRIPTS}/download.py list --name {wildcards.dataset} --dataset-json {params.dataset:q} "
        "--out {output} > {log} 2>&1"


rule download_group:
    input:
        listing=LAYOUT.listing("{dataset}"),
    output:
        manifest=LAYOUT.download_manifest("{dataset}", "{group}"),
    log:
        LAYOUT.log("download", "{dataset}", "group_{group}"),
    params:
        out_dir=lambda wc: LAYOUT.download_dir(wc.dataset, wc.group),
    resources:
        runtime=24 * 60,
    shell:
        "{PYTHON} {SCRIPTS}/download.py fetch --name {wildcards.dataset} --listing {input.listing} "
        "--group {wildcards.group} --out-dir {params.out_dir} --manifest {output.manifest} > {log} 2>&1"


rule download:
    input:
        INDEX.download_manifests,
