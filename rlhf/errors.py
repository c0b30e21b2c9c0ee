"""The exception types the CLI turns into one `error:` line and an exit status (no traceback):
UserError (a mistake the user can fix, exit 2) and TrainingDiverged (NaN or inf, exit 3)."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, missing upstream stage).

    The message is the whole story: it names the file, line, key or flag and says what to do.
    Internal errors are any other exception and keep their traceback.
    """

    exit_code = 2


class TrainingDiverged(UserError):
    """NaN or inf in the loss, KL or scores: the run stops, keeping the last good checkpoint."""

    exit_code = 3
