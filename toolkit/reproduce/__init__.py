"""``repgeo reproduce STUDY``: a study's whole experiment as resumable stages (the existing jobs), then its findings.

``stages`` runs the jobs and knows when one is complete; ``findings`` holds the verdict rules shared by the
studies; ``report`` writes ``findings.json`` and ``report.md``; ``corpora`` builds the prompt files; ``studies/``
has one module per study: its settings per scale, its stages, its findings and its figures.
"""
