"""Built-in gptlab variants. Each module here is an ordinary plugin, loaded like a user's own."""
