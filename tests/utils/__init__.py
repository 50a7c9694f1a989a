"""Scripts the tests run in other processes, and the loopback Hub server."""
