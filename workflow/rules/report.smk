# Report: one tidy results table, the comparison ("is it better at equal compute?") first, the
# published references (every dataset, whatever is scheduled), interactive plots, missing cells.
# `snakemake --report report.zip` shows index.html (self-contained: plotly.js and every figure
# inlined; no PNGs, see osref/report/plots.py) and the CSVs; the rule's cache (<report_dir>/.cache)
# is not an output, so a rerun only re-reads new eval files and rebuilds the figures whose data
# changed (Snakemake deletes the declared outputs first). It waits on our runs' evaluations and,
# only when the config has released models, on their results; never on reference runs.


rule report:
    input:
        evaluations=INDEX.evaluations,
        training=INDEX.final_segments,
        released=INDEX.released_results,
    output:
        html=report(
            LAYOUT.report_file("index.html"),
            caption="../report/report.rst",
            category="Report",
        ),
        comparison=report(
            LAYOUT.report_file("comparison.csv"),
            category="Report",
        ),
        final=report(
            LAYOUT.report_file("final_scores.csv"),
            category="Report",
        ),
        csv=LAYOUT.report_file("results.csv"),
        manifest=LAYOUT.report_manifest(),
    log:
        LAYOUT.log("report", "report"),
    localrule: True
    params:
        manifest=lambda wc: INDEX.report_manifest(),
        reference_dir=repo_path("config", "reference"),
        out_dir=lambda wc: LAYOUT.report_dir(),
    script:
        "../../scripts/report.py"


# The report over what exists. After `snakemake --keep-going` with failed jobs (an export that
# fails its parity gate, an evaluation that crashed) `report` cannot run: some of its inputs are
# missing. This rule has no inputs: it reads the evaluation files present now and lists every
# other scheduled cell under "Missing cells" (missing.csv). Its params name the files present, so
# `snakemake report_partial` rebuilds it exactly when that set changes. Output: <results>/report_partial/.
rule report_partial:
    output:
        html=LAYOUT.report_file("index.html", partial=True),
        csv=LAYOUT.report_file("results.csv", partial=True),
        missing=LAYOUT.report_file("missing.csv", partial=True),
        manifest=LAYOUT.report_manifest(partial=True),
    log:
        LAYOUT.log("report", "report_partial"),
    localrule: True
    params:
        manifest=lambda wc: INDEX.report_manifest(),
        present=lambda wc: INDEX.present_evaluations(),
        reference_dir=repo_path("config", "reference"),
        out_dir=lambda wc: LAYOUT.report_dir(partial=True),
    script:
        "../../scripts/report.py"
