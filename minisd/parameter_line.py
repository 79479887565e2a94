"""One line of A1111's "parameters" text -> its "key: value" pairs, in linear time (minisd/parameters.py reads the
rest of the text).

A1111 finds the pairs with the regex PARAMETER (`re_param`), kept here as the reference: it takes quadratic time on a
long run of key characters without a ":" (100 KB of text: 54 s; a 2 MB PNG chunk hung `regenerate`). key_values
reads the same pairs in one pass with four linear pieces, and tests/test_parameters.py checks that the two agree.
"""

import re

# One "key: value" pair of the last line, as A1111's parser reads it: a key of word characters, spaces, "-" and "/",
# then either a JSON string or anything up to the next comma.
PARAMETER = re.compile(r'\s*(?P<key>\w[\w \-/]+):\s*(?P<value>"(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SPACES = re.compile(r"\s*")
_KEY_TAIL = re.compile(r"[\w \-/]*")
_QUOTED = re.compile(r'"(?:\\.|[^\\"])+"')
_UNQUOTED = re.compile(r"[^,]*")


def key_values(line: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a parameters line: what PARAMETER.findall(line) returns, in linear time.

    At each position: skip spaces; a key is a word character and the longest run of key characters after it, and
    must be followed by ":" (no shorter run can be: ":" is not a key character, so on failure the scan goes on after
    the run); the value is a JSON string followed by "," or the end, else everything up to the next ",".

    >>> key_values('Steps: 20, Size: 512x512, Model: "a, b", ok')
    [('Steps', '20'), ('Size', '512x512'), ('Model', '"a, b"')]
    """
    pairs = []
    i, n = 0, len(line)
    while i < n:
        j = _SPACES.match(line, i).end()
        if j == n:
            break
        if not (line[j].isalnum() or line[j] == "_"):  # \w
            i = j + 1
            continue
        k = _KEY_TAIL.match(line, j + 1).end()
        if k - j < 2 or k == n or line[k] != ":":
            i = k
            continue
        start = _SPACES.match(line, k + 1).end()
        quoted = _QUOTED.match(line, start)
        if quoted and (quoted.end() == n or line[quoted.end()] == ","):
            end = quoted.end()
        else:
            end = _UNQUOTED.match(line, start).end()
        pairs.append((line[j:k], line[start:end]))
        i = end + 1
    return pairs
