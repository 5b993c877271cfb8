"""magma_ros: Microsoft's Magma driving Franka FR3/Panda and WidowX 250s through ROS 2."""

__version__ = "0.1.0"
