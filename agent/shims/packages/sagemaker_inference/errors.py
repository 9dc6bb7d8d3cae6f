"""sagemaker-inference's exceptions, with the same constructors and attributes.

TorchBay's server answers a ``BaseInferenceToolkitError`` with its ``status_code``; an
``UnsupportedFormatError`` carries 415 (a request body it cannot decode) or 406 (a reply it cannot
encode) where sagemaker-inference's server answered 500.
"""

from typing import Any


class UnsupportedFormatError(Exception):
    """A content type the codecs do not handle."""

    def __init__(self, content_type: str, **kwargs: Any) -> None:
        self.content_type = content_type
        self.status_code = kwargs.pop("status_code", 415)
        self._message = (
            f"Content type {content_type} is not supported by this framework. Implement input_fn "
            "to decode the request or output_fn to encode the response."
        )
        super().__init__(self._message, **kwargs)


class BaseInferenceToolkitError(Exception):
    """An error the handler raises to answer with its own HTTP status, message and reason phrase."""

    def __init__(self, status_code: int, message: str, phrase: str) -> None:
        self.status_code = status_code
        self.message = message
        self.phrase = phrase
        super().__init__(status_code, message, phrase)


class GenericInferenceToolkitError(BaseInferenceToolkitError):
    """A BaseInferenceToolkitError whose message defaults to "Invalid Request" and phrase to the
    message."""

    def __init__(
        self, status_code: int, message: str | None = None, phrase: str | None = None
    ) -> None:
        message = message or "Invalid Request"
        super().__init__(status_code, message, phrase or message)
