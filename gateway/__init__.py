"""The HTTP + Socket.IO face of ForgeLLM: translates the REST contract to bus commands."""
