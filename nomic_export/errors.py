"""The one exception type for bad user input; the CLI turns it into a message and exit status 2."""


class UserError(Exception):
    """Bad input from the user: a path, a checkpoint, a flag value.

    The message names the thing, shows the value and says what to do (STYLE.md rule 12).
    """
