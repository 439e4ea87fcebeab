"""medtrain: trains, evaluates and explains models offline."""

__all__: list[str] = []
