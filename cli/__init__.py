"""The command lines' shared parts.

    args.py        the options generate.py and evaluate.py share, their one validation, one-line errors
    outputs.py     generate.py's examples, the checks a loaded model answers, where images go
"""
