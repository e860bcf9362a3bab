"""The small model zoo (prunekit.models): factories usable as arch specs `prunekit.models:NAME`."""

from prunekit.models.encoder import EncoderBlock, SelfAttention, TokenEncoder, encoder
from prunekit.models.examples import EXAMPLES, Example
from prunekit.models.recurrent import (
    BNLSTM,
    BNRNN,
    CELLS,
    BNLSTMCell,
    SeqBatchNorm,
    SequenceClassifier,
    lstm,
)
from prunekit.models.zoo import ACTIVATIONS, cnn, mlp

__all__ = [
    "ACTIVATIONS",
    "BNLSTM",
    "BNRNN",
    "CELLS",
    "EXAMPLES",
    "EncoderBlock",
    "BNLSTMCell",
    "Example",
    "SeqBatchNorm",
    "SelfAttention",
    "SequenceClassifier",
    "TokenEncoder",
    "cnn",
    "encoder",
    "lstm",
    "mlp",
]
