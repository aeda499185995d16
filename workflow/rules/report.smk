# Report: one tidy results table, the curves next to the published ones, missing cells.


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
