"""Multi-tenant replay of recorded agent traces as real processes through agentcgd."""
