"""The one exception type that becomes a client-facing HTTP error."""


class RequestError(Exception):
    """A problem with one request: becomes an HTTP `status` reply with a JSON body {"error": message}."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status
