"""The dry-run planner: parameter counts by module type and training memory per device,
from the architecture alone (meta device and fake tensors; no weights, no data)."""
