"""The command lines' parts: args.py, the options both scripts share; outputs.py and edit.py, generate.py's."""
