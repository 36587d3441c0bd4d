"""HTTP and WebSocket transports. Thin: they parse frames, authenticate and hand tasks to the dispatcher."""
