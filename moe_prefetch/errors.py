"""The one exception type a user should see: a one-line message naming the bad value and what is accepted."""


class PipelineError(Exception):
    """A user-facing error (bad params, input, checkpoint or trace). Stages print it on one line and exit 1."""
