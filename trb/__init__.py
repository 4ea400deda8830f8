"""trb: on-policy distillation with Trust-Region behavior Blending (TRB)."""

__version__ = "0.1.0"
