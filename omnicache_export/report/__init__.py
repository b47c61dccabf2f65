"""report.html: what calibration measured and chose, with its plots."""
