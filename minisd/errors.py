"""The one error type minisd raises for bad input: a one-line message naming what is wrong."""


class MinisdError(ValueError):
    """Bad input from the caller (a parameter out of range, a file that is not SD v1, ...).

    The message is one line that names the parameter or file, what is allowed and what was given. The CLI prints
    it and exits with status 2; the Python API lets it propagate. Internal invariants use `assert` instead.
    """
