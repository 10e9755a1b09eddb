"""The one exception type that the CLI turns into a message without a traceback."""


class DganError(Exception):
    """Bad input or an unusable state, described for a person: what is wrong and how to fix it.

    `exit_code` is what the CLI exits with (2 for invalid configuration or arguments, 1 otherwise).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
