"""Rollout IS reductions over explicitly passed process groups (TP vocab shards, CP, DP x CP)."""
