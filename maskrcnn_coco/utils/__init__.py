"""The bottom floor: rank queries, logging and user-facing errors. Imports nothing above it."""
