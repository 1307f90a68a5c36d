"""Storage drivers. A driver is the only part of flowstate that touches storage."""
