"""Distillation: a latent proposer (vlm/latent_proposer.py) learnt from a VLM's, or CLIP's, own answers,
so that VL-DNP needs no decode and no server at sampling time.

    data.py      the data folder: its settings, the resumable records, the shards of x0 latents
    collect.py   VL-DNP runs with the teacher as proposer, keeping x0, x_t and t at each query
    train.py     the split by prompt, the fit, the thresholds, and the card's held-out numbers

`python distill.py collect PROMPTS.csv --out DATA_DIR ...` and `python distill.py train DATA_DIR --out
FILE` are the command line; generate.py and evaluate.py use the file with --latent-proposer FILE.
"""
