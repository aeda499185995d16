# Released checkpoints (config `released`): list a hub repo's refs once, fetch each selected revision,
# convert it to our export (reference-forward gate), then the same evaluate_shots rule as our runs
# (run_id "released/{release}"). Paths: {runs}/released/{release}/... (osref/paths.py).


rule list_released:
    output:
        LAYOUT.released_listing("{release}"),
    log:
        LAYOUT.log("released", "{release}", "listing"),
    localrule: True
    params:
        request=lambda wc: INDEX.released_listing_request(wc.release),
    shell:
        "{PYTHON} {SCRIPTS}/released.py list --request-json {params.request:q} --out {output:q} > {log:q} 2>&1"


rule released_run_config:
    output:
        LAYOUT.run_json(LAYOUT.released_run("{release}")),
    log:
        LAYOUT.log("released", "{release}", "run_config"),
    localrule: True
    params:
        document=lambda wc: INDEX.released_run_document(wc.release),
    script:
        "../../scripts/write_json.py"


# The listing is ancient(): re-listing (a changed selection re-lists) never re-runs finished fetches.
rule fetch_released:
    input:
        listing=ancient(LAYOUT.released_listing("{release}")),
    output:
        (
            directory(LAYOUT.released_fetch_dir("{release}", "{iteration}"))
            if INDEX.released_keep == "all"
            else temp(directory(LAYOUT.released_fetch_dir("{release}", "{iteration}")))
        ),
    log:
        LAYOUT.log("released", "{release}", "fetch_iter_{iteration}"),
    localrule: config["released"]["fetch_on"] == "login"
    resources:
        released_fetch=1,
        runtime=6 * 60,
    params:
        revision=lambda wc: INDEX.released_revision(wc.release, wc.iteration),
    shell:
        "{PYTHON} {SCRIPTS}/released.py fetch --listing {input.listing:q} --revision {params.revision:q} "
        "--out {output:q} > {log:q} 2>&1"


rule convert_released:
    input:
        fetched=LAYOUT.released_fetch_dir("{release}", "{iteration}"),
        listing=ancient(LAYOUT.released_listing("{release}")),
    output:
        (
            temp(directory(LAYOUT.hf_dir(LAYOUT.released_run("{release}"), "{iteration}")))
            if INDEX.released_keep == "none"
            else directory(LAYOUT.hf_dir(LAYOUT.released_run("{release}"), "{iteration}"))
        ),
    log:
        LAYOUT.log("released", "{release}", "convert_iter_{iteration}"),
    # a finished fetch is converted (and its copy deleted) before the next fetch starts
    priority: 5
    threads: 2
    resources:
        mem_mb=lambda wc: INDEX.released_convert_mem_mb(wc.release),
        runtime=60,
    params:
        repo=lambda wc: INDEX.released_model(wc.release).repo,
        revision=lambda wc: INDEX.released_revision(wc.release, wc.iteration),
        tolerance=config["released"]["tolerance"],
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} {SCRIPTS}/convert_released.py --src {input.fetched:q} --out {output:q} "
        "--repo {params.repo:q} --revision {params.revision:q} --iteration {wildcards.iteration} "
        "--tolerance {params.tolerance:q} > {log:q} 2>&1"


rule released_results:
    input:
        INDEX.released_evaluations,
    output:
        **LAYOUT.released_results(),
    log:
        LAYOUT.log("released", "results"),
    localrule: True
    params:
        manifest=lambda wc: INDEX.released_manifest(),
        reference_dir=repo_path("config", "reference"),
    script:
        "../../scripts/released.py"


# first contact with the hub: list every configured repo (seconds each), nothing downloaded
rule released_listings:
    input:
        INDEX.released_listings,


rule released:
    input:
        INDEX.released_evaluations,
        INDEX.released_results,
