"""Why ``tandem register`` refuses: one module both the command and the folder builders raise from."""

from __future__ import annotations

from shared.errors import TandemError

SPEC_HINT = "make one from training data with `tandem spec fit DATA --target COL > feature_spec.json`"


class RegisterError(TandemError):
    """The model would not serve: nothing was registered. Exit status 1."""

    http_status, code = 400, "register_refused"
    exit_code = 1


class RegisterUsageError(RegisterError):
    """The command line, or a file it names, is wrong (a missing ``--spec``, an unreadable example). Exit 2."""

    code = "register_usage"
    exit_code = 2
