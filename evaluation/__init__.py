"""Evaluation: many prompts, several methods (methods/), one run folder.

    prompts.py   the benchmarks' prompt CSVs, and where each known set is published
    run.py       the run itself: jobs, resumable records, torchrun sharding and the merge
    metrics.py   per-image metrics (NudeNet, CLIP score)
    report.py    the summary table, the Pareto plot and the HTML page

`python evaluate.py PROMPTS.csv --out RUN_DIR` is the command line.
"""
