"""Integrations with the trainers people already run; each needs its optional extra."""
