"""``DefaultInferenceHandler``: the base class inference handlers extend, as in sagemaker-inference.

``default_input_fn`` decodes with :func:`decoder.decode`; ``default_output_fn`` encodes with
:func:`encoder.encode` as the first type of the Accept header it supports and returns
``(body, type)``; ``default_model_fn`` and ``default_predict_fn`` are left to the subclass. Models,
predictions and the serving context are whatever the user's handler makes of them (``Any``).
"""

from typing import Any

from sagemaker_inference import decoder, encoder, errors, utils

__all__ = ["DefaultInferenceHandler"]


class DefaultInferenceHandler:
    """Default model_fn/input_fn/predict_fn/output_fn; a subclass overrides the ones it needs."""

    def default_model_fn(self, model_dir: str, context: Any = None) -> Any:
        raise NotImplementedError(
            "default_model_fn is not provided: implement model_fn(model_dir) in your inference "
            "module"
        )

    def default_input_fn(
        self, input_data: str | bytes, content_type: str, context: Any = None
    ) -> Any:
        return decoder.decode(input_data, content_type)

    def default_predict_fn(self, data: Any, model: Any, context: Any = None) -> Any:
        raise NotImplementedError(
            "default_predict_fn is not provided: implement predict_fn(data, model) in your "
            "inference module"
        )

    def default_output_fn(
        self, prediction: Any, accept: str, context: Any = None
    ) -> tuple[str | bytes, str]:
        """``(body, content type)`` for the first type in ``accept`` the encoder supports."""
        for content_type in utils.parse_accept(accept):
            if content_type in encoder.SUPPORTED_CONTENT_TYPES:
                return encoder.encode(prediction, content_type), content_type
        raise errors.UnsupportedFormatError(accept, status_code=406)
