"""The logical plan: frozen nodes, one per verb, and their analysis."""
