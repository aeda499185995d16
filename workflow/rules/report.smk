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
    params:
        manifest=lambda wc: INDEX.report_manifest(),
        reference_dir=repo_path("config", "reference"),
        out_dir=LAYOUT.report_dir(),
    localrule: True
    script:
        "../../scripts/report.py"
