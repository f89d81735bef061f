"""What a run hands people and other tools: feature cards, the qualitative page, exports, mask stability, provenance."""
