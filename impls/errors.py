"""The one exception type for bad input: unknown names, invalid values, impossible combinations.

Its message is one line naming the bad value and the valid choices; the CLI prints it and exits
with status 2 before any work starts.  Anything else that escapes is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    pass
