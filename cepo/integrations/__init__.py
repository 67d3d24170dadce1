"""CEPO inside other RL trainers.

- :mod:`cepo.integrations.trl`: ``CEPOConfig`` / ``CEPOTrainer``, TRL's ``GRPOTrainer`` with the
  contrastive per-token advantage (``pip install "cepo[trl]"``).

Nothing is imported here, so ``import cepo`` never needs TRL.
"""
