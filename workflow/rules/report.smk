# Report: one tidy results table, the curves next to the published ones, missing cells.
# `snakemake --report report.zip` shows index.html, the final-score table and every plot; the
# rule's cache (<report_dir>/.cache) is not an output, so a rerun only re-reads new eval files
# and redraws the plots whose data changed (Snakemake deletes the declared outputs first).


rule report:
    input:
        evaluations=INDEX.evaluations,
        training=INDEX.final_segments,
    output:
        html=report(
            f"{LAYOUT.report_dir()}/index.html",
            caption="../report/report.rst",
            category="Report",
        ),
        plots=report(
            directory(f"{LAYOUT.report_dir()}/plots"),
            patterns=["{name}.png"],
            category="Plots",
        ),
        final=report(
            f"{LAYOUT.report_dir()}/final_scores.csv",
            category="Report",
        ),
        csv=f"{LAYOUT.report_dir()}/results.csv",
        manifest=LAYOUT.report_manifest(),
    log:
        LAYOUT.log("report", "report"),
    localrule: True
    params:
        manifest=lambda wc: INDEX.report_manifest(),
        reference_dir=repo_path("config", "reference"),
        out_dir=LAYOUT.report_dir(),
    script:
        "../../scripts/report.py"


# The report over what exists. After `snakemake --keep-going` with failed jobs (an export that
# fails its parity gate, an evaluation that crashed) `report` cannot run: some of its inputs are
# missing. This rule has no inputs: it reads the evaluation files present now and lists every
# other scheduled cell under "Missing cells" (missing.csv). Its params name the files present, so
# `snakemake report_partial` rebuilds it exactly when that set changes. Output: <results>/report_partial/.
rule report_partial:
    output:
        html=f"{LAYOUT.report_dir()}_partial/index.html",
        csv=f"{LAYOUT.report_dir()}_partial/results.csv",
        missing=f"{LAYOUT.report_dir()}_partial/missing.csv",
        manifest=f"{LAYOUT.report_dir()}_partial/manifest.json",
    log:
        LAYOUT.log("report", "report_partial"),
    localrule: True
    params:
        manifest=lambda wc: INDEX.report_manifest(),
        present=lambda wc: INDEX.present_evaluations(),
        reference_dir=repo_path("config", "reference"),
        out_dir=f"{LAYOUT.report_dir()}_partial",
    script:
        "../../scripts/report.py"
