"""magma_ros.sim."""
