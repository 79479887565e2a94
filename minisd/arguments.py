"""What the command lines share (`minisd`, `python -m minisd.train`, `python -m weights_convert`): a parser whose
usage errors are one line, the typed arguments, and the names of the dtypes they take."""

import argparse

import torch

# --dtype NAME, and the "Dtype" a PNG's parameters record: torch's names of the floating dtypes minisd computes in.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2 (argparse prints the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str, most: int | None = None) -> int:
    """An argparse type: an integer >= 1, and <= most if given (then the type is partial(positive_int, most=N)).

    >>> positive_int("3")
    3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1 or (most is not None and value > most):
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {most or 'inf'}], got {value}")
    return value


def number(text: str) -> float:
    """An argparse type: a float (argparse's own `float` would name itself in its error)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
