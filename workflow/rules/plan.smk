# Plan: the cost of the grid (iterations, checkpoints, FLOPs, GPU-hours, jobs), from config alone.
# The job fills the data-dependent columns (counted tokens, epochs, warnings) from what exists
# when it runs; they are not params, so tokenizing the data does not re-schedule `plan`
# (`snakemake --profile local plan -f` refreshes them).


rule plan:
    output:
        LAYOUT.plan_csv(),
    log:
        LAYOUT.log("plan", "plan"),
    localrule: True
    params:
        rows=lambda wc: INDEX.plan_params(),
    script:
        "../../scripts/plan.py"
