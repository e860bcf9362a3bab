"""The small model zoo (prunekit.models): factories usable as arch specs `prunekit.models:NAME`."""

from prunekit.models.examples import EXAMPLES, Example
from prunekit.models.zoo import ACTIVATIONS, cnn, mlp

__all__ = ["ACTIVATIONS", "EXAMPLES", "Example", "cnn", "mlp"]
