"""The one exception type for user mistakes: the CLI prints its message (no traceback) and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, missing upstream stage).

    The message is the whole story: it names the file, line, key or flag and says what to do.
    Internal errors are any other exception and keep their traceback.
    """

    exit_code = 2
