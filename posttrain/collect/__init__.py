"""The human feedback loop: a local web app where people compare, rate, edit and flag model answers.

    store.py        the project's SQLite file (WAL, one writer, versioned schema, append-only event log)
    queue.py        who annotates what next: leases, caps, fewest votes first, gold and qualification
    agreement.py    Krippendorff's alpha, Cohen's kappa, annotator reliability, health alerts
    leaderboard.py  Bradley-Terry ratings with bootstrap intervals (Chatbot Arena's maths)
    export.py       dpo | kto | rm | sft | eval | redteam rows with provenance, data card, lineage
    web.py          the FastAPI app (optional extra: pip install 'posttrain[collect]')
    cli.py          ``posttrain collect ...``

The web app is the only part that needs the extra; the statistics and exports run without it.
"""
