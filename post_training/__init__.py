"""Post-training toolkit for Megatron models: quantize, distill, speculative decoding, export."""
import warnings as _warnings

__version__ = "0.1.0"

# Import-time notices of megatron-core / ModelOpt that say nothing actionable to a user of
# this toolkit (the local spec is chosen on purpose, and says so). Narrow, message-matched.
for _msg in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"transformers .* is not tested with current version of modelopt",
    r"tp_group is None",
    r"full scope is deprecated",  # TransformerConfig's own default, not something we set
    # torch deprecations raised inside megatron-core's dist-checkpoint reader
    r"`load_state_dict` is deprecated and will be removed",
    r"Please use DTensor instead and we are deprecating ShardedTensor",
):
    _warnings.filterwarnings("ignore", message=_msg)
