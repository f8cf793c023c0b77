"""capsexp: what a capsule head with dynamic routing does to fine-tuning a ResNet50."""

__version__ = "0.1.0"
