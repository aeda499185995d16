# Evaluate: lm-eval-harness on an export, one job per (checkpoint, shot set), offline.


if INDEX.eval_tasks_marker:

    rule build_eval_tasks:
        input:
            corpus=INDEX.local_tasks_corpus,
        output:
            INDEX.eval_tasks_marker,
        log:
            LAYOUT.log("evaluate", "build_eval_tasks"),
        params:
            out_dir=lambda wc: LAYOUT.eval_tasks_dir(),
        shell:
            "{PYTHON} {SCRIPTS:q}/build_eval_tasks.py --manifest={input.corpus:q} --out={params.out_dir:q} > {log:q} 2>&1"


# Also evaluates released checkpoints (run_id "released/{name}", workflow/rules/released.smk) and
# their extra tasks (shots "extra-{task}-{k}shot", one task per file).
rule evaluate_shots:
    input:
        hf=LAYOUT.hf_dir("{run_id}", "{iteration}"),
        run=LAYOUT.run_json("{run_id}"),
        tasks=INDEX.eval_tasks_marker,
        # ancient: prefetching again (a new extra task) must not re-run the evaluations already done
        prefetched=ancient(INDEX.prefetch_marker),
    output:
        LAYOUT.eval_json("{run_id}", "{iteration}", "{shots}"),
    log:
        LAYOUT.log("evaluate", "{run_id}", "iter_{iteration}", "{shots}"),
    wildcard_constraints:
        **EVALUATE_WILDCARD_CONSTRAINTS,
    threads: config["cluster"]["eval_resources"]["cpus"]
    resources:
        **INDEX.eval_resources,
    params:
        protocol=lambda wc: INDEX.eval_tasks_json(wc.run_id, wc.shots),
        include=[f"--include-path={LAYOUT.eval_tasks_dir()}"] if INDEX.eval_tasks_marker else [],
        batch_size=config["evaluation"]["batch_size"],
        device=config["evaluation"]["device"],
        dtype=config["evaluation"]["dtype"],
        limit=[f"--limit={config['evaluation']['limit']}"] if config["evaluation"]["limit"] else [],
        hf_home=lambda wc: LAYOUT.eval_hf_home(),
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} {SCRIPTS:q}/evaluate.py --hf-dir={input.hf:q} --run-json={input.run:q} "
        "--iteration={wildcards.iteration:q} --shots={wildcards.shots:q} --tasks-json={params.protocol:q} {params.include:q} "
        "--batch-size={params.batch_size:q} --device={params.device:q} --dtype={params.dtype:q} {params.limit:q} "
        "--hf-home={params.hf_home:q} --out={output:q} > {log:q} 2>&1"


rule evaluate:
    input:
        INDEX.evaluations,


# Fill the shared HF cache with every protocol task's datasets; needs network, so it runs where
# Snakemake runs (the login node), never as a cluster job. Run it once before going offline:
#   snakemake prefetch_eval_data
rule prefetch_eval_data:
    output:
        LAYOUT.prefetch_marker(),
    log:
        LAYOUT.log("evaluate", "prefetch_eval_data"),
    localrule: True
    params:
        protocol=INDEX.prefetch_tasks_json,
        hf_home=lambda wc: LAYOUT.eval_hf_home(),
    shell:
        "{PYTHON} {SCRIPTS:q}/prefetch_eval_data.py --tasks-json={params.protocol:q} --hf-home={params.hf_home:q} "
        "--out={output:q} > {log:q} 2>&1"
