"""``parse_accept``: the MIME types of an Accept header, in order (no q-values), as
sagemaker-inference reads it."""

__all__ = ["parse_accept"]


def parse_accept(accept: str) -> list[str]:
    return accept.replace(" ", "").split(",")
