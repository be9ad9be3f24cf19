"""Training and evaluating λ-nets and linear heads: data, feature cache, trainer, evaluation.

``python -m app train`` / ``python -m app evaluate`` are thin flags over ``pipeline``.
"""
