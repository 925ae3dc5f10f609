"""What a failed multi-process launch said: torchrun's stderr interleaves every rank's output and
ends with its own report, so its tail alone may not show which rank failed first, or why."""
import re

CLUES = re.compile(r"Error|error:|terminate called|Traceback|exitcode|Signal|Aborted|Killed|timed out")


def launch_failure(stderr: str, tail: int = 1500, most: int = 40) -> str:
    """The stderr lines that name an error, an exit or a signal (up to ``most``), then its last ``tail`` characters."""
    clues = [line for line in stderr.splitlines() if CLUES.search(line)][:most]
    return "lines naming errors:\n" + "\n".join(clues) + "\n--- stderr tail ---\n" + stderr[-tail:]
