"""The one exception type for bad user input: the CLI prints its message as a single line and exits 1."""


class Llama2MLXError(Exception):
    """A problem with the user's input (a file, a field, a flag) that a person can fix.

    The message must name the file, line or field and say what is wrong; the CLI shows it without a traceback.
    """
