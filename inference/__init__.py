"""The ML runtime shared by the node and medtrain: pixels in, probabilities out."""

__all__: list[str] = []
