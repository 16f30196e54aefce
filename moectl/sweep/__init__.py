"""`moectl sweep`: a spec of legs -> one sweep directory -> every leg through the runner.

    spec.py     the TOML spec: validation, grid expansion, leg tags
    store.py    sweep.json on disk: load/save, find a sweep, resume chains, a leg's live state
    report.py   the comparison of completed legs, the recommendation, the sweep report's markdown
    run.py      running the legs (new sweep or resume), interruption, figures, commits

Data flows one way: spec -> run -> store -> report; `moectl.summary` reads store and report only.
"""
