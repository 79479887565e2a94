"""The one error type minisd raises for bad input: a one-line message naming what is wrong."""

MAX_MESSAGE = 500  # characters: a message quotes what it was given (a key, a prompt, a path), never all of it


class MinisdError(ValueError):
    """Bad input from the caller (a parameter out of range, a file that is not SD v1, ...).

    The message is one line that names the parameter or file, what is allowed and what was given. The CLI prints
    it and exits with status 2; the Python API lets it propagate. Internal invariants use `assert` instead.
    Whatever a message quotes, it is made one line (runs of whitespace become one space) of at most MAX_MESSAGE
    characters, so a 25 MB key or a multi-line error from torch stays a readable line.

    >>> str(MinisdError("no key\\n  " + "k" * 1000))[-40:]
    'kkkkkkkkkkkkkkkkk… (537 more characters)'
    """

    def __init__(self, message: object = ""):
        text = " ".join(str(message).split())
        if len(text) > MAX_MESSAGE:
            cut = MAX_MESSAGE - 30
            text = f"{text[:cut]}… ({len(text) - cut} more characters)"
        super().__init__(text)
