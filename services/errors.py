"""The one exception type for errors a user can cause and fix."""


class UserError(ValueError):
    """A bad request, unreadable image, wrong model or missing setting; the message says what to fix.

    Workers record the message as the job's failure reason and go on serving.
    """
