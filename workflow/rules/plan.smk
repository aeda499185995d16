# Plan: the cost of the grid (iterations, checkpoints, FLOPs, GPU-hours, jobs), from config alone.


rule plan:
    output:
        LAYOUT.plan_csv(),
    log:
        LAYOUT.log("plan", "plan"),
    params:
        rows=lambda wc: plan_rows(GRID),
    localrule: True
    script:
        "../../scripts/plan.py"
