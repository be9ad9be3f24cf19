"""Task ``act``: environment states in, equivariant Q-values and greedy actions out (deep Q-learning).

Import-light on purpose: ``symmetries`` (groups, pure torch), ``envs`` (gymnasium), ``qnet``,
``model`` and ``training`` are imported by whoever needs them.
"""

from app.tasks import TaskParts

PARTS = TaskParts(
    model=".model:ActModel", http=".http:HTTP", limits=".settings:ActLimits", cli=".cli", docs="docs/dqn.md"
)
