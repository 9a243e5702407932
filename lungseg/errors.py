"""The one exception type lungseg raises for problems the user can fix."""


class LungsegError(Exception):
    """Bad input or configuration. The message names the file or setting, what was
    expected and how to fix it; entry points print it as one paragraph, without a traceback."""
