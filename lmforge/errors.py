"""User-facing errors: the CLI prints these as one line on stderr and exits with code 2."""


class LmforgeError(Exception):
    """A mistake in the user's input (file, config, data, prompt), not a bug in lmforge."""


class ConfigError(LmforgeError):
    """An unknown config key, a wrong type, or an invalid value."""


class DataError(LmforgeError):
    """A missing, empty or unreadable input file or corpus."""


class TokenizerMismatchError(LmforgeError):
    """A tokenizer whose vocabulary does not match the model or dataset."""


class PromptTooLongError(LmforgeError):
    """A prompt that does not fit in the model's context."""


class Interrupted(LmforgeError):
    """A run stopped cleanly by Ctrl-C or SIGTERM: the message says where its checkpoint is and how to resume.
    The CLI prints it as one line and exits with code 130, as for any interrupt."""
