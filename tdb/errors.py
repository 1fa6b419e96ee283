"""The one exception type for bad input: its message names the problem and what is allowed."""

import re


class TdbError(ValueError):
    """Raised for anything the user can fix; the CLI prints the message and exits with code 2.

    >>> raise TdbError("--k: must be >= 0, got -1")
    """


def reason(error: BaseException) -> str:
    """A library's exception as part of a one-line TdbError: its first line, at most 200
    characters (torch's unpickler, for one, explains itself over many lines).

    >>> raise TdbError(f"{path}: not a weights file ({reason(e)})") from None
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # terminal colours (torch.load has some)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    # Control characters (from a corrupted file, say) are shown escaped, not sent to a terminal.
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= 200 else text[:197] + "..."
