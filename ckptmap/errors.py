"""The one exception type ckptmap raises for problems a user can fix."""


class CkptmapError(Exception):
    """A user-facing error: the message names the file, the tensor, what was expected,
    what was found, and what to do. The CLI prints it as one paragraph and exits non-zero."""
