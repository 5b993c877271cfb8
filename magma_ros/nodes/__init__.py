"""magma_ros.nodes."""
