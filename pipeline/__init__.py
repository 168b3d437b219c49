"""Training, evaluation and tracking for anomaly-representation pretraining."""

__version__ = "0.1.0"
