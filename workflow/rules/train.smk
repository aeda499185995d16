# Train: a run is a chain of segment jobs, each resuming from the latest complete checkpoint and
# ending at a checkpoint iteration. Checkpoints live outside Snakemake's outputs; the segment's
# output is a small marker, so a failed job never deletes saved checkpoints.


rule run_config:
    output:
        LAYOUT.run_json("{run_id}"),
    log:
        LAYOUT.log("train", "{run_id}", "run_config"),
    localrule: True
    params:
        document=lambda wc: INDEX.run_document(wc.run_id),
    script:
        "../../scripts/write_json.py"


rule train_segment:
    input:
        run=LAYOUT.run_json("{run_id}"),
        data=lambda wc: INDEX.tokenized_inputs(wc.run_id),
        previous=lambda wc: INDEX.previous_segment(wc.run_id, wc.end),
    output:
        LAYOUT.segment_marker("{run_id}", "{end}"),
    log:
        LAYOUT.log("train", "{run_id}", "segment_{end}"),
    # keep the training chain moving: its next segment before queued exports and evaluations
    priority: 10
    threads: lambda wc: INDEX.train_threads(wc.run_id)
    resources:
        nodes=lambda wc: INDEX.train_resources(wc.run_id)["nodes"],
        gres=lambda wc: INDEX.train_resources(wc.run_id)["gres"],
        tasks_per_gpu=0,
        mpi=lambda wc: INDEX.train_resources(wc.run_id)["mpi"],
        tasks=lambda wc: INDEX.train_resources(wc.run_id)["tasks"],
        runtime=lambda wc: INDEX.train_resources(wc.run_id)["runtime"],
        mem_mb=lambda wc: INDEX.train_resources(wc.run_id)["mem_mb"],
        cpus_per_task=lambda wc: INDEX.train_resources(wc.run_id)["cpus_per_task"],
    params:
        until=lambda wc: int(wc.end),
        launcher=lambda wc: INDEX.train_launcher(wc.run_id),
        env=INDEX.train_env(),
    shell:
        # env and launcher are command words, quoted where they are built (osref/workflow.py)
        "{params.env} {params.launcher} {SCRIPTS:q}/train.py --run-json={input.run:q} "
        "--until={params.until:q} --marker={output:q} > {log:q} 2>&1"


rule train:
    input:
        INDEX.final_segments,
