"""Dataset writers: LeRobot v3.0 (crash-safe staging), MCAP bags in ROS 2 encoding, statistics."""
