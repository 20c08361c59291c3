"""The run report (``imgcurate report``): what a run kept and dropped, in one self-contained HTML file.

``collect.py`` makes one bounded pass over a run's data files and sidecars (histograms, seeded
samples per outcome, a sample of image embeddings) and turns the few rows it shows into
thumbnails; ``explorer.py`` clusters the embedding sample into the treemap's hierarchy
(DendroMap); ``html.py`` writes the page (Plotly, inlined). ``jobs/report.py`` puts them together.
"""
