"""agentcgd: the composition root, socket server and restore logic."""
