"""The one exception type for bad input: its message names the problem and what is allowed."""


class TdbError(ValueError):
    """Raised for anything the user can fix; the CLI prints the message and exits with code 2.

    >>> raise TdbError("--k: must be >= 0, got -1")
    """
