"""Evaluation: many prompts, several methods (methods/), one run folder.

    prompts.py         the benchmarks' prompt CSVs, and where each known set is published
    protocol.py        named protocols (--protocol vl-dnp): the options a paper's evaluation fixes
    run.py             the run itself: jobs, torchrun sharding, one image per job
    run_folder.py      the run folder: run.json, the lock, resuming, the records and their merge
    metrics.py         per-image metrics (NudeNet, CLIP score)
    classifier_file.py where NudeNet's older classifier, the paper's metric, comes from
    report.py          the summary table and the HTML page; plot.py draws the Pareto plot

`python evaluate.py PROMPTS.csv --out RUN_DIR` is the command line.
"""
