"""magma_ros.core."""
