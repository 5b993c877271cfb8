"""magma_ros.serve."""
