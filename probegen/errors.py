"""User-facing errors: one clear line naming the file or key and the problem, non-zero exit."""

import functools
import sys


class ProbegenError(Exception):
    """Bad input (params, archive, checkpoint, ...). The message is one line that names the culprit."""


def cli(main):
    """Wrap a stage's main(): a ProbegenError becomes `error: <message>` on stderr and exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ProbegenError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    return wrapper
