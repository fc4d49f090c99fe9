"""The one exception type for bad user input; the CLI turns it into a message and exit status 2."""


class UserError(Exception):
    """Bad input from the user: a path, a checkpoint, a flag value.

    The message names the thing, shows the value and says what to do (STYLE.md rule 12).
    """

    exit_code = 2


class VerificationError(UserError):
    """An export missed a verification gate; ``results`` holds every variant's figures."""

    exit_code = 1

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results
