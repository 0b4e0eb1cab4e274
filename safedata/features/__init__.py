"""Per-example features: hidden-state representations and loss gradients."""
