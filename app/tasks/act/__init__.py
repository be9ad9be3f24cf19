"""Task ``act``: environment states in, equivariant Q-values and greedy actions out (deep Q-learning).

Import-light on purpose: ``symmetries`` (groups, pure torch), ``envs`` (gymnasium), ``qnet``,
``runner`` and ``task`` are imported by whoever needs them.
"""
