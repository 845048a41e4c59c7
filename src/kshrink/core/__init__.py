"""The machinery every technique shares: configs and handlers, recipes, selection, reports."""
