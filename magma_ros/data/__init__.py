"""magma_ros.data."""
