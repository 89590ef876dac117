"""agentcg command line (click): thin calls into agentcg.client."""
