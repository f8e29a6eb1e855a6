"""pytest hooks (placeholder)."""
