"""App plugins: what joins outside tools to the bus."""
