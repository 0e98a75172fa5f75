"""The comparison report of a sweep (`mmray.report.writer.write_report`).

`summary` reads the selected runs back from MLflow, `stats` holds the statistics (numpy/scipy
only), `compare` turns runs into numbers and series, `plots` draws the PNGs, `render` writes
Markdown and HTML, and `writer` puts it together. Nothing here starts Ray.
"""
