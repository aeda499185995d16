# Export: a checkpoint -> Hugging Face safetensors + config + tokenizer, behind a logit parity
# gate against the Megatron model (no output when the gate fails).


rule export_hf:
    input:
        run=LAYOUT.run_json("{run_id}"),
        segment=lambda wc: INDEX.segment_of_checkpoint(wc.run_id, wc.iteration),
    output:
        directory(LAYOUT.hf_dir("{run_id}", "{iteration}")),
    log:
        LAYOUT.log("export", "{run_id}", "iter_{iteration}"),
    threads: 1
    resources:
        runtime=60,
        mem_mb=32000,
    params:
        dtype=config["evaluation"]["export_dtype"],
        tolerance=lambda wc: INDEX.runs[wc.run_id].parity_tolerance,
    shell:
        "OMP_NUM_THREADS={threads} {PYTHON} {SCRIPTS:q}/export_hf.py --run-json={input.run:q} "
        "--iteration={wildcards.iteration:q} --out={output:q} --dtype={params.dtype:q} --tolerance={params.tolerance:q} "
        "> {log:q} 2>&1"


rule export:
    input:
        INDEX.exports,
