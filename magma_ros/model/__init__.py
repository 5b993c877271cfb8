"""magma_ros.model."""
