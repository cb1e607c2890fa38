"""What generate.py and evaluate.py share: checking arguments, building the proposer, the PNG's text.

    args.py        one-line usage errors, device and dtype, model and output checks
    proposers.py   the VL-DNP proposer a command line asks for
    metadata.py    the `parameters` text that SD tools read from a PNG
"""
