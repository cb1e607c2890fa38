"""The option types of the methods' command-line options (Method.add_options) and the shared ones
(cli/args.py): argparse turns a bad value into one line naming the option."""
import argparse
import math


def finite(text: str) -> float:
    """argparse type: a float that is neither inf nor NaN, which would only end in a NaN image."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def comma_list(item=str):
    """argparse type: "a, b,a" -> ["a", "b"] (deduplicated, in order), each item converted by `item`."""
    def parse(text: str) -> list:
        return list(dict.fromkeys(item(part.strip()) for part in text.split(",") if part.strip()))
    parse.__name__ = getattr(item, "__name__", "list")  # argparse names the type in its message
    return parse
