"""Everything Ray Serve: the launcher and its child process, the Serve app and its gRPC servicer."""
