"""Every setting of the toolkit, as small typed dataclasses: one home per field.

Each class is one concern, documented field by field and validated in ``__post_init__`` (a bad
value is a :class:`~post_training.utils.UsageError`, one line for the user). Entry points build
them from Megatron-LM's flag names in :mod:`post_training.arguments`; library code receives them
explicitly. This module imports neither megatron-core nor ModelOpt (flag parsing and
``--preflight`` stay cheap), and nothing here knows flag names except the error messages.

Shared fields live once: ``seed`` in :class:`ParallelConfig` (the runtime seeds every generator
from it; sampling and training draw from it too), ``seq_length`` in :class:`ModelConfig`,
``micro_batch_size`` / ``global_batch_size`` in :class:`BatchConfig`.
"""
from post_training.config.core import *  # noqa: F401,F403
from post_training.config.core import _check  # noqa: F401
from post_training.config.speculative import *  # noqa: F401,F403
from post_training.config.training import *  # noqa: F401,F403
